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


def test_pdl_compiles_the_step_with_inductors_option_and_gives_the_eager_tokens(deep_llama, monkeypatch):
    """KVBENCH_PDL=1: the compiled step is compiled with inductor's ``triton.enable_pdl`` (its Triton kernels then
    launch as kvbench's do; on the CPU the option changes no code) and gives the eager tokens."""
    import torch._dynamo
    import torch._inductor.config as inductor
    seen = []
    monkeypatch.setenv("KVBENCH_PDL", "1")
    samples = [sample(prompt(60, 1), prompt(5, 2), new=6, sid="a")]
    eager = Engine(deep_llama, registry.build_method("snapkv", 0.5), compile_decode=False).generate(samples)
    torch._dynamo.reset()
    with inductor.patch({"post_grad_custom_post_pass": lambda graph: seen.append(inductor.triton.enable_pdl),
                         "fx_graph_cache": False}):
        got = Engine(deep_llama, registry.build_method("snapkv", 0.5), compile_decode=True).generate(samples)
    torch._dynamo.reset()
    assert seen and all(seen), seen  # compiled with the option on
    assert inductor.triton.enable_pdl is False  # and only there
    assert [r["prediction"] for r in got] == [r["prediction"] for r in eager]


def test_pdl_without_inductors_option_is_refused_before_any_work(deep_llama, monkeypatch):
    from kvbench import engine
    monkeypatch.setenv("KVBENCH_PDL", "1")
    monkeypatch.setattr(engine, "inductor_has_pdl", lambda: False)  # an inductor from before torch 2.9
    with pytest.raises(ParameterError, match="KVBENCH_PDL=1 .* triton.enable_pdl"):
        Engine(deep_llama, registry.build_method("full", 1.0), compile_decode=True)
    Engine(deep_llama, registry.build_method("full", 1.0), compile_decode=False)  # eager: kvbench's kernels only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch needs a CUDA GPU")
@pytest.mark.parametrize("name", ["full", "snapkv", "h2o"])
def test_pdl_decoding_replayed_on_the_gpu_gives_the_tokens_without_it(name, monkeypatch):
    """On the GPU (Hopper: PDL in effect; older: the same launches without it): the compiled, graph-replayed step
    with every linear layer through the skinny GEMM, with and without KVBENCH_PDL, gives the same tokens."""
    import torch._dynamo

    from kvbench.kernels.skinny_gemm import use_skinny_linear
    model, _ = models.random_model("tiny-llama", torch.bfloat16, "cuda", 0)
    model.generation_config.eos_token_id = None
    use_skinny_linear(model)
    lm = LoadedModel(model, IdTokenizer(), "tiny-llama", 4096)
    samples = [sample(prompt(300, 1), prompt(5, 2), new=24, sid="a"), sample(prompt(200, 3), prompt(7, 4), new=24, sid="b")]
    runs = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("KVBENCH_PDL", pdl)
        torch._dynamo.reset()
        out = Engine(lm, registry.build_method(name, 0.5), compile_decode=True).generate(samples)
        assert all(r.get("cuda_graph") for r in out), out[0]
        runs.append([r["prediction"] for r in out])
    torch._dynamo.reset()
    assert runs[0] == runs[1]
