"""A scripted, actively malicious secure-aggregation server (tests only, never the product).

It drives honest :class:`SecAggClient` objects through a round itself (no SecAggServer
checks in its way) and tries to learn an individual input instead of the sum:

* **equivocation**: it keeps every masked input, then tells one half of the cohort "you
  survived, the others dropped" and the other half the reverse (after asking each half to
  vote on its own split), hoping for the self-mask seed b_u from some holders and the mask
  key s_u^SK from others;
* **fake partners**: it fills the key directory with key pairs and identities it owns;
* **chosen graph**: it picks the neighbour-graph seed itself.

An attack returns the inputs it recovered (client id -> decoded update); one that the honest
clients stopped ends in the SecAggError they raised.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from confide.privacy.secagg import (
    KeyDirectory,
    MaskedInputRequest,
    SecAggClient,
    SecAggConfig,
    UnmaskRequest,
    UpdateEncoder,
)
from confide.privacy.secagg.identity import (
    Roster,
    advertisement_bytes,
    directory_graph_seed,
    raw_public,
)
from confide.privacy.secagg.keys import pairwise_mask_seed
from confide.privacy.secagg.masking import add_mask, pairwise_sign, reduce_mod
from confide.privacy.secagg.messages import ConsistencyRequest
from confide.privacy.secagg.protocol import _round_graph
from confide.privacy.secagg.shamir import reconstruct_secret


def recover_input(config: SecAggConfig, round_number: int, cid: int, masked: np.ndarray,
                  b_seed: bytes, mask_private: bytes, graph: dict[int, frozenset[int]],
                  mask_publics: dict[int, bytes]) -> np.ndarray:
    """x_u from y_u, b_u and s_u^SK: strip the self mask and every pairwise mask."""
    y = masked.copy()
    add_mask(y, b_seed, -1)
    sk = X25519PrivateKey.from_private_bytes(mask_private)
    for v in sorted(graph[cid]):
        seed = pairwise_mask_seed(sk, mask_publics[v], config.session_id, round_number)
        add_mask(y, seed, -pairwise_sign(cid, v))
    reduce_mod(y, config)
    update, _ = UpdateEncoder(config).decode(y)
    return update


class MaliciousServer:
    def __init__(self, config: SecAggConfig, clients: dict[int, SecAggClient],
                 round_number: int = 1) -> None:
        self.config = config
        self.clients = clients
        self.round = round_number
        self.fake: dict[int, SecAggClient] = {}  # parties the server runs itself

    # -- stages 0-2, each with a hook an attack may replace -------------------------------
    def directory(self, adverts: dict) -> KeyDirectory:
        keys = {c: (a.encryption_public, a.mask_public) for c, a in adverts.items()}
        identities = {c: a.identity for c, a in adverts.items() if a.identity}
        return KeyDirectory(self.config.session_id, self.round,
                            graph_seed=self.graph_seed(keys, identities), public_keys=keys,
                            identities=identities,
                            signatures={c: a.signature for c, a in adverts.items()
                                        if a.signature})

    def graph_seed(self, keys: dict, identities: dict) -> bytes:
        return directory_graph_seed(self.config.session_id, self.round, keys, identities)

    def run_to_masked(self, updates: dict[int, np.ndarray]):
        everyone = {**self.clients, **self.fake}
        adverts = {c: cl.advertise_keys() for c, cl in everyone.items()}
        directory = self.directory(adverts)
        shares = {c: cl.share_keys(directory) for c, cl in everyone.items()}
        graph = _round_graph(self.config, directory.public_keys, directory.graph_seed)
        candidates = tuple(sorted(shares))
        masked, votes = {}, {}
        for c, cl in everyone.items():
            env = {u: shares[u].envelopes[c] for u in sorted(graph[c])}
            request = MaskedInputRequest(self.config.session_id, self.round, receiver=c,
                                         envelopes=env, candidates=candidates)
            out = cl.masked_input(request, updates.get(c, np.zeros(self.config.vector_length)))
            masked[c], votes[c] = out.vector, out.vote
        return directory, graph, masked, votes

    # -- the attacks ------------------------------------------------------------------------
    def equivocate(self, updates: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Split the cohort in halves A, B; tell A "B dropped" and B "A dropped"."""
        directory, graph, masked, _ = self.run_to_masked(updates)
        ids = sorted(self.clients)
        half_a, half_b = set(ids[: len(ids) // 2]), set(ids[len(ids) // 2:])
        b_shares: dict[int, dict[int, int]] = {c: {} for c in ids}
        sk_shares: dict[int, dict[int, int]] = {c: {} for c in ids}
        for mine, others in ((half_a, half_b), (half_b, half_a)):
            split = dict(survivors=tuple(sorted(mine)), dropped=tuple(sorted(others)))
            votes = {}
            if self.clients[ids[0]].authenticated:  # ask this half to vote on its split
                ask = ConsistencyRequest(self.config.session_id, self.round, **split)
                votes = {c: self.clients[c].consistency_vote(ask).vote for c in sorted(mine)}
            request = UnmaskRequest(self.config.session_id, self.round, votes=votes, **split)
            for c in sorted(mine):
                answer = self.clients[c].unmask(request)
                for owner, share in answer.self_mask_shares.items():
                    b_shares[owner][c] = share
                for owner, share in answer.mask_key_shares.items():
                    sk_shares[owner][c] = share
        return self._recover(directory, graph, masked, b_shares, sk_shares)

    def _recover(self, directory, graph, masked, b_shares, sk_shares):
        t = int(self.config.threshold)
        mask_publics = {v: k[1] for v, k in directory.public_keys.items()}
        return {c: recover_input(self.config, self.round, c, masked[c],
                                 reconstruct_secret(b_shares[c], t),
                                 reconstruct_secret(sk_shares[c], t), graph, mask_publics)
                for c in sorted(self.clients)
                if len(b_shares[c]) >= t and len(sk_shares[c]) >= t}

    def fill_with_fakes(self, updates: dict[int, np.ndarray], victim: int,
                        fakes: int) -> dict[int, np.ndarray]:
        """Run `fakes` parties of its own (fresh identities) beside the honest clients: when
        they are at least t of the victim's share holders they hold t shares of both of its
        secrets, no unmasking needed."""
        first = max(self.clients) + 1
        signed = self.clients[victim].authenticated  # the fakes look like the honest ones
        for cid in range(first, first + fakes):
            self.fake[cid] = SecAggClient(
                self.config, cid, self.round,
                identity=Ed25519PrivateKey.generate() if signed else None,
                roster=_PermissiveRoster(frozenset()) if signed else None)
        directory, graph, masked, _ = self.run_to_masked(updates)
        held = {c: self.fake[c]._held[victim] for c in sorted(graph[victim]) if c in self.fake}
        b_shares = {victim: {c: h[0] for c, h in held.items()}}
        sk_shares = {victim: {c: h[1] for c, h in held.items()}}
        return self._recover(directory, graph, masked,
                             {c: b_shares.get(c, {}) for c in self.clients},
                             {c: sk_shares.get(c, {}) for c in self.clients})


class _PermissiveRoster(Roster):
    """The server's own parties accept any directory."""

    def check_directory(self, identities, own_id, own_identity) -> None:
        return None


def impersonating_advert(client: SecAggClient, key: Ed25519PrivateKey):
    """A client's advertisement re-signed with another identity."""
    advert = client.advertise_keys()
    cfg = client.config
    signature = key.sign(advertisement_bytes(cfg.session_id, client.round, advert.sender,
                                             advert.encryption_public, advert.mask_public))
    return advert, raw_public(key), signature
