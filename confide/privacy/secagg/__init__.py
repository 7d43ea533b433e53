"""Transport-free SecAgg+ core with distributed discrete Gaussian noise.

Protocol: Bonawitz et al. 2017 (SecAgg) with the sparse neighbour graph of Bell et al. 2020
(SecAgg+); noise: Kairouz, Liu, Steinke 2021 (distributed discrete Gaussian) with the
sampler of Canonne, Kamath, Steinke 2020.

Driving one round (an adapter moves the messages; every message has ``to_bytes()`` and
``Message.from_bytes()``)::

    cfg = SecAggConfig(session_id, num_clients=n, vector_length=d, l2_clip=1.0, noise_stddev=s)
    server = SecAggServer(cfg, r)                        # per round
    client = SecAggClient(cfg, node_id, r)               # per round, per client
    server.receive(client.advertise_keys())              # stage 0
    directory = server.key_directory()                   # broadcast
    server.receive(client.share_keys(directory))         # stage 1
    requests = server.masked_input_requests()            # one per client
    server.receive(client.masked_input(requests[node_id], update, weight))  # stage 2
    unmask = server.unmask_request()                     # broadcast
    server.receive(client.unmask(unmask))                # stage 3
    result = server.result()  # result.weighted_sum, result.total_weight

Folding (2 exchanges per round in steady state): round r+1's objects are independent of
round r's, so the fit exchange of round r carries [MaskedInputRequest(r) + KeyDirectory(r+1)]
down and [MaskedInput(r) + ShareKeys(r+1)] up, and the unmask exchange carries
[UnmaskRequest(r)] down and [UnmaskShares(r) + AdvertiseKeys(r+2)] up; round r+1's
MaskedInputRequest then goes out with round r+1's fit instruction. This needs the cohort of
round r+1 to be chosen during round r.
"""

from .config import SecAggConfig
from .ddg_accounting import (
    DDGParams,
    DistributedDGAccountant,
    calibrate_noise_stddev,
    ddg_epsilon,
    ddg_params_from_config,
)
from .discrete_gaussian import sample_discrete_gaussian, sample_discrete_gaussian_exact
from .errors import (
    SecAggAbort,
    SecAggDecryptionError,
    SecAggError,
    SecAggProtocolError,
    SecAggRefusal,
    SecAggValidationError,
)
from .messages import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    MaskedInputRequest,
    Message,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)
from .protocol import SecAggClient, SecAggResult, SecAggServer
from .quantize import UpdateEncoder

__all__ = [
    "AdvertiseKeys",
    "DDGParams",
    "DistributedDGAccountant",
    "KeyDirectory",
    "MaskedInput",
    "MaskedInputRequest",
    "Message",
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggDecryptionError",
    "SecAggError",
    "SecAggProtocolError",
    "SecAggRefusal",
    "SecAggResult",
    "SecAggServer",
    "SecAggValidationError",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskShares",
    "UpdateEncoder",
    "calibrate_noise_stddev",
    "ddg_epsilon",
    "ddg_params_from_config",
    "sample_discrete_gaussian",
    "sample_discrete_gaussian_exact",
]
