"""Hugging Face transformers models (tiny configs, random weights, nothing downloaded): every
method, in every mode, against the float64 reference; dict inputs and ModelOutput outputs."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

import fastntk
from conftest import METHOD_MODES, assert_matches_reference
from fastntk._functional import flatten_output

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the test extra: pip install -e .[test]")
transformers.logging.set_verbosity_error()

VOCAB, LENGTH = 7, 4


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=LENGTH, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def gpt2_config(tied: bool = False) -> "transformers.GPT2Config":
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=LENGTH, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=2, tie_word_embeddings=tied,
    )


def vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=8, patch_size=4,
        num_channels=3, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.ViTForImageClassification(config)


def masked_tokens(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids with an attention mask that pads the end of every other sample."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[::2, LENGTH - 2:] = 0
    return {"input_ids": torch.randint(1, VOCAB, (n, LENGTH), generator=g), "attention_mask": mask}


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int], object]]] = {
    "bert_masked": (bert, masked_tokens),
    "gpt2_lm_head": (lambda: transformers.GPT2LMHeadModel(gpt2_config()), tokens),
    # the output projection is the token embedding: one parameter used by two ops (the
    # structured one-block Gram once counted its streamed share twice)
    "gpt2_lm_head_tied": (lambda: transformers.GPT2LMHeadModel(gpt2_config(tied=True)), tokens),
    "gpt2_classifier": (lambda: transformers.GPT2ForSequenceClassification(gpt2_config()), tokens),
    "vit": (vit, images),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().double().eval()


def inputs(name: str, n: int, seed: int) -> object:
    return MODELS[name][1](n, seed)


@pytest.mark.parametrize("gram", [False, True], ids=["x1-x2", "gram"])
@pytest.mark.parametrize("method, mode", METHOD_MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_transformers_match_reference(name: str, method: str, mode: str, gram: bool) -> None:
    """Regression: BERT with an attention mask raised vmap's .item() error from every method; the
    GPT-2 models' outputs (logits beside a cache) were refused."""
    x2 = None if gram else inputs(name, 2, 2)
    assert_matches_reference((__name__, name, gram), lambda: build(name), inputs(name, 3, 1), x2, method, mode)


def test_model_output_counts_by_its_logits() -> None:
    """A ModelOutput's logits are its outputs; loss, caches and None fields are not."""
    logits = torch.randn(2, 3)
    out = transformers.modeling_outputs.SequenceClassifierOutput(loss=torch.tensor(1.0), logits=logits, hidden_states=None)
    torch.testing.assert_close(flatten_output(out, 2), logits)


def test_model_output_without_logits_flattens_its_tensor_fields() -> None:
    hidden, pooled = torch.randn(2, 4, 3), torch.randn(2, 3)
    out = transformers.modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled, attentions=None)
    torch.testing.assert_close(flatten_output(out, 2), torch.cat([hidden.reshape(2, -1), pooled], dim=1))


def test_gpt2_lm_head_outputs_are_its_logits() -> None:
    """O = sequence length × vocabulary: the logits only, not the cache beside them."""
    kernel = fastntk.ntk(build("gpt2_lm_head"), tokens(2, 1), mode="diagonal", method="jacobian")
    assert kernel.shape == (2, 2, LENGTH * VOCAB)


def test_bert_is_detected_as_unbatchable_once() -> None:
    fn = fastntk.ntk_fn(build("bert_masked"), method="jacobian")
    fn(masked_tokens(3, 1))
    assert fn._batchable == {next(iter(fn._batchable)): False}
