"""Every method's stores provide the ``Store`` protocol the cache and the engine call (no duck typing)."""
import inspect

import pytest

from kvbench import registry
from kvbench.cache import KVCache, Store
from kvbench.engine import Engine

from tests.conftest import tiny

PROTOCOL = [name for name, _ in inspect.getmembers(Store) if not name.startswith("_")]


@pytest.mark.parametrize("name,params", [("full", {}), ("snapkv", {}), ("selectfit", {}),
                                         ("deltakv", {"random_init": True}), ("kvcar", {})])
def test_every_store_provides_the_protocol(name, params):
    lm = tiny("llama")
    method = registry.build_method(name, 0.5, params)
    engine = Engine(lm, method)
    cache: KVCache = engine.new_cache(1)
    assert {"nbytes", "attend", "append", "has_tokens", "reserve", "replayed", "concat", "clone"} <= set(PROTOCOL)
    for store in cache.stores:
        missing = [m for m in PROTOCOL if not callable(getattr(store, m, None))]
        assert not missing, f"{type(store).__name__} lacks {missing}"
        assert store.has_tokens() is False
