"""``EVICTOR+CODEC``: an eviction method chooses which tokens stay, a per-token codec codes what stays.

``--method snapkv+kvcar`` builds ``Composed(evict=SnapKV(...), codec=KVCAR(...))``. The cache's stores are
the codec's; before the eviction method runs, the layer's codes are decoded into a ``RaggedKV``-shaped view
(``store.decoded_view()``: same slots, same positions, same per-slot state) so the method scores keys
in the form it would have scored uncompressed (post-RoPE); they are the codec's reconstructions, not the
original keys, which the cache no longer holds; its ``keep``/``remove_one`` are applied to the codes. The memory is the
codec's store after eviction, measured as always.

Any eviction method (a method whose store is the plain ``RaggedKV``, i.e. that only chooses tokens) composes
with any codec whose class sets ``token_codec = True`` and whose stores implement ``decoded_view``.
Parameters are routed by name: ``-m window=64`` goes to whichever part has a field ``window``; a name both
parts have must name its part (``random+kvcar``: ``-m random.seed=1`` or ``-m kvcar.seed=1``); the budget is the
eviction method's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from kvbench.cache import LayerCall
from kvbench.method import BudgetError, Method


class _ViewCall(LayerCall):
    """A layer call whose store is the decoded view of the codec's store."""

    @property
    def store(self):
        return self._view


def _viewed(call: LayerCall) -> LayerCall:
    out = copy.copy(call)
    out.__class__ = _ViewCall
    out._view = call.store.decoded_view()
    return out


@dataclass
class Composed(Method):
    evict: Method = field(default=None)
    codec: Method = field(default=None)

    def __post_init__(self):
        if type(self.evict).new_store is not Method.new_store:
            raise BudgetError(f"{type(self.evict).__name__} keeps more than a choice of tokens: only an eviction "
                              "method can come before '+'")
        if not getattr(type(self.codec), "token_codec", False):
            raise BudgetError(f"{type(self.codec).__name__} is not a per-token codec: only such a method (kvcar) can "
                              "come after '+'")

    def prepare(self, lm) -> None:
        self.evict.prepare(lm)
        self.codec.prepare(lm)

    def new_store(self, layer: int, batch: int, heads: int, head_dim: int, dtype, device):
        return self.codec.new_store(layer, batch, heads, head_dim, dtype, device)

    def compress(self, call: LayerCall) -> None:
        self.codec.compress(call)
        if not self.evict.keeps_everything():
            self.evict.compress(_viewed(call))

    def compress_cache(self, cache) -> None:
        self.codec.compress_cache(cache)
        if not self.evict.keeps_everything():
            self.evict.compress_cache(cache)

    def on_decode(self, call: LayerCall) -> None:
        self.codec.on_decode(call)
        if not self.evict.static_decode():
            self.evict.on_decode(_viewed(call))

    def keeps_everything(self) -> bool:
        return self.evict.keeps_everything()

    def artifact_paths(self) -> list[str]:
        return self.evict.artifact_paths() + self.codec.artifact_paths()

    def static_decode(self) -> bool:
        return self.evict.static_decode() and self.codec.static_decode()

    def decode_epoch(self, cache):
        return () if self.static_decode() else None


def build(names: list[str], budget, params: dict, build_one) -> Composed:
    """``Composed`` of ``names = [evictor, codec]`` with the parameters routed to the part that has them."""
    import dataclasses

    from kvbench.registry import METHODS, UnknownNameError, load
    if len(names) != 2 or not all(names):
        raise UnknownNameError(f"'{'+'.join(names)}': compose exactly two methods, an eviction method and a codec "
                               "(e.g. snapkv+kvcar)")
    classes = [load(METHODS, "method", n) for n in names]
    fields = [{f.name for f in dataclasses.fields(c)} - {"budget"} for c in classes]
    parts: list[dict] = [{}, {}]
    for key, value in params.items():
        name, _, rest = key.partition(".")
        if rest and name in names:
            parts[names.index(name)][rest] = value
            continue
        owners = [i for i in range(2) if key in fields[i]]
        if not owners:
            raise UnknownNameError(f"neither {names[0]} nor {names[1]} has a parameter '{key}'")
        if len(owners) == 2:
            raise UnknownNameError(f"both {names[0]} and {names[1]} have a parameter '{key}': write "
                                   f"{names[0]}.{key}= or {names[1]}.{key}=")
        parts[owners[0]][key] = value
    evict = build_one(names[0], budget, parts[0])
    return Composed(budget=evict.budget, evict=evict, codec=build_one(names[1], 1.0, parts[1]))
