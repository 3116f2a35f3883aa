"""A long-running ClientApp process for one SuperNode.

By default a SuperNode's SuperExec starts a fresh `flwr-clientapp` process for
every message, which imports torch and transformers again and reloads the data
and the model: seconds per client and round. Flower 1.39's `flwr-clientapp`
handles one task and exits, but a SuperNode started with `--isolation process`
leaves launching to an outside process that acquires tasks on its Runtime API.
This is that process: it acquires each task and runs fedtune's ClientApp in
itself, so imports, the data splits (``fedtune.task``'s cache) and the page cache
stay warm. It follows `flwr-clientapp`'s protocol (pull the task input, run the
app, push the reply and the updated context) without its exit at the end.

Only fedtune's own ClientApp runs here, the one installed with this process; a
run whose app names another ClientApp gets an error reply. Per-run state lives in
the Context the SuperNode hands over with each task, never in this process.

    python -m fedtune.deploy.worker --runtime-api-address 127.0.0.1:9094
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedtune.environment import configure_process

CLIENT_APP = "fedtune.app.client:app"
log = logging.getLogger("fedtune.worker")


def serve(runtime_api_address: str, app: ClientApp, poll_s: float = 0.5) -> None:
    """Acquire and run the SuperNode's ClientApp tasks with ``app``, one at a time, forever."""
    acquirer = _client(runtime_api_address, RuntimeVersionHttpInterceptor(component_name="SuperExec"))
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    while True:
        reply = acquirer.AcquireTask(request)  # fails, ending this process, only when the SuperNode is gone
        if reply.HasField("task") and reply.token:
            try:
                run_task(runtime_api_address, reply.token, app)
            # One task's trouble must not end the worker: e.g. its run was stopped meanwhile,
            # or Flower's HTTP retry, refused the task's token, interrupted this process (SIGINT).
            except (Exception, KeyboardInterrupt):
                log.exception("task abandoned")
        else:
            time.sleep(poll_s)


def run_task(runtime_api_address: str, token: str, app: ClientApp) -> None:
    """One task, as `flwr-clientapp` runs it: pull message and context, call the
    app, push the reply (an error reply if the app raised) and the context."""
    client = _client(runtime_api_address, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                     RuntimeTokenHttpInterceptor(token))
    heartbeat = HeartbeatSender(lambda: _beat(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed"
    try:
        message, context, _, fab = pull_task_input(client)
        component = get_fab_config(fab.content)["tool"]["flwr"]["app"]["components"]["clientapp"]
        if component != CLIENT_APP:
            raise RuntimeError(f"this SuperNode runs {CLIENT_APP} only, the run asks for {component}")
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # the app's failure is the run's business: report it, keep serving
        log.exception("ClientApp raised")
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    try:
        if reply is not None and context is not None:
            push_message(client, reply, context)
    finally:
        heartbeat.stop()
        push_task_output(client, context, status, details)
        client.close()


def _client(address: str, *interceptors) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker(),
    )


def _beat(client: RuntimeHttpClient) -> bool:
    # Unlike Flower's heartbeat, never raise SIGINT on a cancelled task: that
    # would end this process, which outlives the task.
    try:
        client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
    except httpx.HTTPError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description="fedtune's long-running ClientApp process for one SuperNode")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --port)")
    parser.add_argument("--app", default=CLIENT_APP, metavar="MODULE:NAME",
                        help="the ClientApp object to serve runs of fedtune's app with (tests plant a hostile one)")
    args = parser.parse_args()
    configure_process()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    module, _, name = args.app.partition(":")
    serve(args.runtime_api_address, getattr(importlib.import_module(module), name))


if __name__ == "__main__":
    main()
