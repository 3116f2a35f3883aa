"""privacy.mode -> its policy: the one place that maps a mode to its halves."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.methods.base import Method
from fedtune.privacy.client_level import ClientLevelClient, ClientLevelDP
from fedtune.privacy.sample_level import SampleLevelClient, SampleLevelDP
from fedtune.privacy.policy import ClientPrivacy, PrivacyPolicy


def server_privacy(config: RunConfig, partition_sizes: dict[int, int]) -> PrivacyPolicy:
    """The server's policy; ``partition_sizes``: each client's number of examples."""
    mode = config.privacy.mode
    if mode == "client":
        return ClientLevelDP(config, partition_sizes)
    if mode == "sample":
        return SampleLevelDP(config, partition_sizes)
    return PrivacyPolicy()


def client_privacy(config: RunConfig, method: Method, client: int, examples: int) -> ClientPrivacy:
    """A client's policy for one round; ``examples``: the size of its partition."""
    mode = config.privacy.mode
    if mode == "client":
        return ClientLevelClient(config, method, client, examples)
    if mode == "sample":
        return SampleLevelClient(config, client, examples)
    return ClientPrivacy()


def check_method(config: RunConfig, method: Method) -> None:
    """Refuse, with one line, a privacy mode the method cannot give."""
    p = config.privacy
    if p.mode == "sample" and method.kind != "adapter":
        raise FedtuneError(f"privacy.mode 'sample' is DP-SGD, which needs gradients; {method.name} takes none: "
                           "use privacy.mode 'client'")
    if p.mode == "client" and p.noise_on == "clients" and not method.noise_shares:
        raise FedtuneError(f"{method.name} takes privacy.noise_on 'server' only: its clients' noise shares would "
                           "have to cover every value it releases")
    if p.mode != "none" and (reason := method.private_release_blocker()):
        raise FedtuneError(reason)


def grid_overrides(value: str) -> list[str]:
    """The overrides of a comparison's privacy axis value: none, or MODE:EPSILON."""
    if value == "none":
        return ["privacy.mode=none"]
    mode, _, epsilon = value.partition(":")
    if not epsilon:
        raise FedtuneError(f"grid.privacy value {value!r}: write none or MODE:EPSILON, e.g. sample:8")
    return [f"privacy.mode={mode}", f"privacy.epsilon={epsilon}"]
