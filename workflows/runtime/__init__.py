"""The runtime: the RQ job that runs a node, the worker classes, ctx, heartbeats, dispatch."""
