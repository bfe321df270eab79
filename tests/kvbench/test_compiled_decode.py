"""The decoding step through torch.compile (``Engine(compile_decode=True)``, ``KVBENCH_COMPILE=1``): the model's own
operations compile and fuse, kvbench's cache and the method's decode-time hook run eagerly inside, and the tokens
are those of the eager step. One compiled layer serves every layer (no recompiling per layer index)."""
import pytest
import torch

from kvbench import models, registry
from kvbench.engine import Engine
from kvbench.models import IdTokenizer, LoadedModel
from kvbench.registry import ParameterError

from tests.conftest import prompt, sample


@pytest.fixture(scope="module")
def deep_llama():
    # more layers than dynamo's recompile limit (8): a per-layer recompile would leave layers eager
    spec = dict(models.PRESETS["tiny-llama"], num_hidden_layers=10)
    models.PRESETS["tiny-llama-10"] = spec
    try:
        model, _ = models.random_model("tiny-llama-10", torch.float32, "cpu", 0)
    finally:
        del models.PRESETS["tiny-llama-10"]
    model.generation_config.eos_token_id = None
    return LoadedModel(model, IdTokenizer(), "tiny-llama-10", 4096)


@pytest.mark.parametrize("name", ["full", "snapkv", "h2o"])
def test_compiled_decoding_step_gives_the_eager_tokens(deep_llama, name):
    import torch._dynamo
    samples = [sample(prompt(60, 1), prompt(5, 2), new=6, sid="a"), sample(prompt(48, 3), prompt(7, 4), new=6, sid="b")]
    eager = Engine(deep_llama, registry.build_method(name, 0.5), compile_decode=False).generate(samples)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # a recompile per layer index fails here
        compiled = Engine(deep_llama, registry.build_method(name, 0.5), compile_decode=True).generate(samples)
    assert [r["prediction"] for r in compiled] == [r["prediction"] for r in eager]
    assert [r["kv_ratio_end"] for r in compiled] == pytest.approx([r["kv_ratio_end"] for r in eager])


def test_a_compile_mode_that_adds_its_own_cuda_graphs_is_refused_before_any_work(deep_llama, monkeypatch):
    # reduce-overhead / max-autotune capture CUDA graphs of their own inside kvbench's capture of the step
    monkeypatch.setenv("KVBENCH_COMPILE_MODE", "reduce-overhead")
    with pytest.raises(ParameterError, match="max-autotune-no-cudagraphs"):
        Engine(deep_llama, registry.build_method("full", 1.0), compile_decode=True)
    monkeypatch.setenv("KVBENCH_COMPILE_MODE", "max-autotune-no-cudagraphs")
    assert Engine(deep_llama, registry.build_method("full", 1.0), compile_decode=True).compile_mode == \
        "max-autotune-no-cudagraphs"


def test_frozen_weights_fuse_the_projections_and_give_the_eager_tokens(deep_llama):
    """``Engine(freeze=True)``: inductor's freezing makes each layer's weights constants, so q/k/v (one input)
    become one GEMM and gate/up another; every one of the 10 layers compiles on its own (past dynamo's default
    limit of 8, raised by the engine), and the tokens are the eager ones. On the CPU inductor fuses them only
    when asked (``cpp.enable_concat_linear``) and packs weights for MKL unless told not to; on CUDA it fuses."""
    import torch._dynamo
    import torch._inductor.config as inductor
    cfg = deep_llama.model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    qkv = cfg.hidden_size + 2 * cfg.num_key_value_heads * hd
    widths = []

    def record_gemm_widths(graph):  # the output width of every matrix product with a constant weight
        for node in graph.nodes:
            if node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                weight = node.args[-1]
                if weight.op == "get_attr":
                    widths.append(node.meta["val"].shape[-1])

    samples = [sample(prompt(60, 1), prompt(5, 2), new=6, sid="a"), sample(prompt(48, 3), prompt(7, 4), new=6, sid="b")]
    eager = Engine(deep_llama, registry.build_method("snapkv", 0.5), compile_decode=False).generate(samples)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), \
            inductor.patch({"cpp.enable_concat_linear": True, "cpp.weight_prepack": False,
                            "post_grad_custom_post_pass": record_gemm_widths, "fx_graph_cache": False}):
        frozen = Engine(deep_llama, registry.build_method("snapkv", 0.5), compile_decode=True, freeze=True)
        got = frozen.generate(samples)
    torch._dynamo.reset()
    assert [r["prediction"] for r in got] == [r["prediction"] for r in eager]
    assert widths.count(qkv) >= cfg.num_hidden_layers, widths  # one q/k/v GEMM a layer
    assert widths.count(2 * cfg.intermediate_size) >= cfg.num_hidden_layers, widths  # one gate/up GEMM a layer
    assert cfg.num_key_value_heads * hd not in widths  # no k or v projection left alone
