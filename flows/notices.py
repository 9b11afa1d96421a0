"""Failure notices: a Prefect automation that notifies you when a Fashion-MNIST flow run fails or crashes.

    python flows/notices.py --slack https://hooks.slack.com/services/...     # on the server of PREFECT_API_URL
    python flows/notices.py --webhook https://example.com/hooks/fashion      # any URL: a JSON POST

Run once against the Prefect server that runs the deployment (its automation services must be on,
as they are for `prefect server start`); running it again replaces the notice. The notification
block is `fashion-mnist-failures`, the automation `fashion-mnist run failed`: both are in the UI.
"""

from __future__ import annotations

import argparse
import sys

from prefect.automations import Automation, EventTrigger, Posture, SendNotification
from prefect.blocks.notifications import CustomWebhookNotificationBlock, NotificationBlock, SlackWebhook

from fashion_pipeline.flows.launch import TAG
from fashion_pipeline.tasks.plumbing.failures import command_failed

BLOCK, AUTOMATION = "fashion-mnist-failures", "fashion-mnist run failed"
FLOWS = ("fashion-mnist", "fashion-mnist-sweep")
SUBJECT = "Fashion-MNIST: flow run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = ("Flow run {{ flow_run.name }} of {{ flow.name }} ended {{ flow_run.state.name }}: "
        "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}")


def notification_block(webhook: str | None = None, slack: str | None = None) -> NotificationBlock:
    """The block that carries the notice: a Slack incoming webhook, or a JSON POST to any URL."""
    if slack:
        return SlackWebhook(url=slack)
    return CustomWebhookNotificationBlock(name=BLOCK, url=webhook,
                                          json_data={"subject": "{{subject}}", "body": "{{body}}"})


def create_failure_notice(block: NotificationBlock) -> Automation:
    """Save `block` and (re)create the automation: a fashion-mnist flow run Failed or Crashed -> a notice."""
    block_id = block.save(BLOCK, overwrite=True)
    try:
        Automation.read(name=AUTOMATION).delete()
    except ValueError:  # none yet
        pass
    return Automation(
        name=AUTOMATION,
        description=f"Notifies {BLOCK} when a run of {' or '.join(FLOWS)} fails or crashes.",
        tags=[TAG],
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(FLOWS)},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    ).create()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notices.py", description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--slack", metavar="URL", help="A Slack incoming-webhook URL.")
    where.add_argument("--webhook", metavar="URL", help="Any URL: the notice is POSTed as JSON {subject, body}.")
    args = parser.parse_args(argv)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("notices.py: error: set PREFECT_API_URL to the server that runs the deployment", file=sys.stderr)
        return 2
    try:
        automation = create_failure_notice(notification_block(args.webhook, args.slack))
    except Exception as error:  # noqa: BLE001  (the server unreachable, a bad URL: one line)
        return command_failed("notices.py", error)
    print(f"Automation {automation.name!r} notifies block {BLOCK!r} when a run of {', '.join(FLOWS)} fails or crashes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
