"""Definitions: the spec (pydantic), versions of it, and the registry of node types."""
