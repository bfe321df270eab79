"""Engine and protocol promises found broken by the engine audit: each test failed before its fix."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kvbench import attention, models


def _tiny_model(family: str, **overrides):
    attention.register()
    cfg = dict(models.PRESETS[f"tiny-{family}"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, **overrides)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention.NAME)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sliding_window_layers_are_refused(family):
    """A Qwen model whose layers attend within a window ran with full attention: another model's outputs."""
    with pytest.raises(models.ModelError, match="sliding-window"):
        models.check_drivable(_tiny_model(family, use_sliding_window=True, sliding_window=8, max_window_layers=0))
    # use_sliding_window with every layer below max_window_layers: no layer slides, the model is drivable
    models.check_drivable(_tiny_model(family, use_sliding_window=True, sliding_window=8, max_window_layers=2))
    with pytest.raises(models.ModelError, match="sliding-window"):
        models.check_drivable(_tiny_model("mistral", sliding_window=8))


def _bos_in_post_processor_tokenizer():
    """A Llama-3-style tokenizer: the BOS is added by the post-processor, and add_bos_token reads False."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_plain_prompt_starts_as_the_tokenizer_starts_a_text():
    """Without a chat template the prompt lost a BOS that the tokenizer adds in its post-processor."""
    from kvbench.task import build_prompt
    from tests.conftest import make_tokenizer
    tok = _bos_in_post_processor_tokenizer()
    ctx, q = build_prompt(tok, "a b", " b", chat=False)
    assert ctx + q == tok.encode("a b") + [4] == [0, 3, 4, 4]
    plain = make_tokenizer(chat_template=False)  # adds nothing of its own: nothing added
    ctx, q = build_prompt(plain, "The grass", " is green", chat=True)
    assert ctx + q == plain.encode("The grass", add_special_tokens=False) + plain.encode(" is green", add_special_tokens=False)


def test_sliding_window_directory_is_refused_before_its_weights(tmp_path):
    """One line from config.json, before the weights are read (there are none here)."""
    _tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0).config.save_pretrained(tmp_path)
    with pytest.raises(models.ModelError, match="sliding-window"):
        models.check_model_dir(tmp_path, trust_remote_code=False)


def test_pickled_weights_are_refused(tmp_path):
    """Weights load from safetensors only: a directory whose weights are a pickle (pytorch_model.bin) is refused
    in one line before anything is unpickled."""
    from safetensors.torch import load_file
    model = _tiny_model("llama")
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(tmp_path)
    from tests.conftest import make_tokenizer
    make_tokenizer().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(models.ModelError, match="pickle"):
        models.load(str(tmp_path))
