"""privacy.mode -> its policy: the one place that maps a mode to its halves."""

from __future__ import annotations

from fedtune.config import RunConfig
from fedtune.errors import FedtuneError
from fedtune.methods.base import Method
from fedtune.privacy.client_level import ClientLevelClient, ClientLevelDP
from fedtune.privacy.policy import ClientPrivacy, PrivacyPolicy
from fedtune.privacy.sample_level import SampleLevelClient, SampleLevelDP


def server_privacy(config: RunConfig, partition_sizes: dict[int, int], root: int) -> PrivacyPolicy:
    """The server's policy; ``partition_sizes``: each client's number of examples;
    ``root``: the seed of the server's randomness (fedtune/privacy/secrets.py)."""
    policy = {"client": ClientLevelDP, "sample": SampleLevelDP}.get(config.privacy.mode, PrivacyPolicy)
    return policy(config, partition_sizes, root)


def client_privacy(config: RunConfig, method: Method, client: int, examples: int, rnd: int) -> ClientPrivacy:
    """``client``'s policy in round ``rnd``; ``examples``: the size of its partition."""
    policy = {"client": ClientLevelClient, "sample": SampleLevelClient}.get(config.privacy.mode)
    return policy(config, method, client, examples, rnd) if policy else ClientPrivacy()


def check_method(config: RunConfig, method: Method) -> None:
    """Refuse, with one line, a privacy mode the method cannot give."""
    p = config.privacy
    if p.mode == "sample" and method.kind != "adapter":
        raise FedtuneError(f"privacy.mode 'sample' is DP-SGD, which needs gradients; {method.name} takes none: "
                           "use privacy.mode 'client'")
    if p.mode == "client" and method.stacks_clients:
        raise FedtuneError(f"privacy.mode 'client' cannot cover {method.name}: it releases each client's factors on their "
                           "own, and how many there are tells who took part; use privacy.mode 'sample' (DP-SGD)")
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
