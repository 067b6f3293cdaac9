"""One registry of operator actions: every surface reads it."""

import pytest
from django.core.management import get_commands, load_command_class
from django.urls import reverse

from workflows import actions
from workflows.admin import NodeRunAdmin, RunAdmin
from workflows.api.actions import router

RUN_ACTIONS = ["resume", "retry", "rollback", "cancel", "skip", "mark_succeeded", "stop_node"]


def test_the_registry_holds_the_run_and_queue_actions():
    assert [action.name for action in actions.for_target("run")] == RUN_ACTIONS
    assert {action.name for action in actions.for_target("queue")} == {
        "clear_queue",
        "requeue_failed",
    }


@pytest.mark.parametrize("name", RUN_ACTIONS)
def test_every_run_action_has_a_page_an_endpoint_and_a_command(name):
    action = actions.get(name)
    assert reverse(f"dashboard:run-{action.slug}-preview", args=[1])
    assert reverse(f"dashboard:run-{action.slug}", args=[1])
    paths = {path for path in router.path_operations}
    assert any(path.endswith(f"/{action.slug}") for path in paths), paths
    commands = {
        load_command_class(app, command).action
        for command, app in get_commands().items()
        if app == "workflows" and hasattr(load_command_class(app, command), "action")
    }
    assert name in commands


def test_the_admin_offers_each_run_action_it_can_apply_to_a_selection():
    offered = {
        function.__name__
        for admin in (RunAdmin, NodeRunAdmin)
        for function in admin.actions
        if callable(function)
    }
    assert {
        "resume_runs",
        "cancel_runs",
        "retry_nodes",
        "skip_nodes",
        "rollback_to_node",
        "stop_nodes",
    } <= offered


def test_every_action_has_an_input_model_with_a_reason():
    for action in [*actions.for_target("run"), *actions.for_target("queue")]:
        schema = action.input_model().model_json_schema()
        assert "reason" in schema["required"], action.name
        assert schema["additionalProperties"] is False, action.name


def test_bad_input_names_the_field():
    retry = actions.get("retry")
    with pytest.raises(actions.ActionInputError) as caught:
        retry.clean({"reason": "flaky", "node": "load", "downstream": "yes"})
    assert caught.value.field == "downstream"
    assert str(caught.value).startswith("downstream:")
    with pytest.raises(actions.ActionInputError) as caught:
        retry.clean({"reason": "   ", "node": "load"})
    assert caught.value.field == "reason"
    with pytest.raises(actions.ActionInputError) as caught:
        retry.clean({"reason": "x", "node": "load", "colour": "red"})
    assert caught.value.field == "colour"


def test_an_unknown_action_lists_the_known_ones():
    with pytest.raises(actions.UnknownAction, match="the actions are: cancel, clear_queue"):
        actions.get("explode")


def test_names_and_slugs_both_find_an_action():
    assert actions.get("mark-succeeded") is actions.get("mark_succeeded")
