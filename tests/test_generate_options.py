"""Every `generate` option on a speculatively patched model: served (the output is plain decoding's) or a
fallback to the original `generate` with the reason in `handle.stats`; never an error where the unpatched
model has none, never a different output. The cases cover every field of the installed transformers'
`GenerationConfig` and every `generate()` argument, so a field added by a new transformers fails here
until it is judged and listed in engine.py's SERVED_OPTIONS or FALLBACK_OPTIONS."""
from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from tiny_models import tiny_model
from transformers import (
    CompileConfig,
    GenerationConfig,
    LogitsProcessorList,
    MaxLengthCriteria,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    WatermarkingConfig,
)
from transformers.generation.streamers import BaseStreamer

import hfpatch
from hfpatch.techniques.generation.engine import FALLBACK_OPTIONS, SERVED_OPTIONS

RECIPE, RECIPE_ARGS = "recycling+lookup", {"node_cost": 0.03}  # fixed cost model: decisions not load-dependent
#: bookkeeping fields of GenerationConfig.to_dict(), not options
META_FIELDS = {"transformers_version", "_from_model_config"}
TEXT = "the cat sat on the mat and the cat sat on the mat and t"
EXTRA_TOKENS = ["th", "the", "ca", "cat", "at", "an", "and"]  # extensions of one-character tokens: healing acts


def char_tokenizer():
    """One token per character plus a few multi-character vocabulary entries, ids < 128 (the tiny models')."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "\n\t" + "".join(chr(c) for c in range(32, 127))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    vocab.update({t: len(vocab) + i for i, t in enumerate(EXTRA_TOKENS)})
    assert max(vocab.values()) < 128
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


class Recorder(BaseStreamer):
    """A streamer that keeps what it is given (compared between the unpatched and the patched call)."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.chunks.append("end")


def config_cases(prompt):
    """GenerationConfig field -> generate kwargs setting it to a non-default value valid on a tiny llama."""
    n = prompt.shape[1]
    sampling = dict(do_sample=True)
    eos = dict(eos_token_id=[2, 40])  # 40: a token the random model emits now and then, so the rule can act
    return {
        "max_length": dict(max_length=n + 9),
        "max_new_tokens": dict(max_new_tokens=7),
        "min_length": dict(min_length=n + 12, **eos),
        "min_new_tokens": dict(min_new_tokens=10, **eos),
        "early_stopping": dict(early_stopping=True),
        "max_time": dict(max_time=300.0),
        "stop_strings": dict(stop_strings=["e", "a"], tokenizer="TOKENIZER"),
        "do_sample": dict(do_sample=True),
        "num_beams": dict(num_beams=2),
        "use_mtp": dict(use_mtp=True),  # the tiny model has no MTP layers: both raise the same error
        "use_cache": dict(use_cache=False),
        "cache_implementation": dict(cache_implementation="static"),
        "cache_config": dict(cache_config={"nbits": 4}),
        "max_cache_len": dict(max_cache_len=64),
        "temperature": dict(temperature=0.7, **sampling),
        "top_k": dict(top_k=5, **sampling),
        "top_p": dict(top_p=0.8, **sampling),
        "min_p": dict(min_p=0.05, **sampling),
        "top_h": dict(top_h=0.5, **sampling),
        "typical_p": dict(typical_p=0.8, **sampling),
        "epsilon_cutoff": dict(epsilon_cutoff=0.005, **sampling),
        "eta_cutoff": dict(eta_cutoff=0.005, **sampling),
        "repetition_penalty": dict(repetition_penalty=1.5),
        "encoder_repetition_penalty": dict(encoder_repetition_penalty=1.5),
        "length_penalty": dict(length_penalty=0.5),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "bad_words_ids": dict(bad_words_ids=[[5], [7, 8]]),
        "renormalize_logits": dict(renormalize_logits=True, repetition_penalty=1.2),
        "forced_bos_token_id": dict(forced_bos_token_id=5),
        "forced_eos_token_id": dict(forced_eos_token_id=9),
        "remove_invalid_values": dict(remove_invalid_values=True),
        "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(3, 1.5), **eos),
        "suppress_tokens": dict(suppress_tokens=[5, 6, 40]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[5, 40]),
        "sequence_bias": dict(sequence_bias={(40,): 3.0, (41, 42): 5.0}),
        "token_healing": dict(token_healing=True, tokenizer="TOKENIZER"),
        "guidance_scale": dict(guidance_scale=1.5),
        "watermarking_config": dict(watermarking_config=WatermarkingConfig(bias=2.0)),
        "num_return_sequences": dict(num_return_sequences=2, do_sample=True),
        "output_attentions": dict(output_attentions=True, return_dict_in_generate=True),
        "output_hidden_states": dict(output_hidden_states=True, return_dict_in_generate=True),
        "output_scores": dict(output_scores=True, return_dict_in_generate=True),
        "output_logits": dict(output_logits=True, return_dict_in_generate=True),
        "return_dict_in_generate": dict(return_dict_in_generate=True),
        "pad_token_id": dict(pad_token_id=3),
        "bos_token_id": dict(bos_token_id=4),
        "eos_token_id": dict(eos_token_id=[2, 40, 41]),
        "encoder_no_repeat_ngram_size": dict(encoder_no_repeat_ngram_size=2),
        "decoder_start_token_id": dict(decoder_start_token_id=1),
        "is_assistant": dict(is_assistant=True),  # only meaningful on an assistant: both raise the same error
        "num_assistant_tokens": dict(num_assistant_tokens=5),
        "num_assistant_tokens_schedule": dict(num_assistant_tokens_schedule="heuristic"),
        "assistant_confidence_threshold": dict(assistant_confidence_threshold=0.2),
        "prompt_lookup_num_tokens": dict(prompt_lookup_num_tokens=3),
        "max_matching_ngram_size": dict(max_matching_ngram_size=2),
        "assistant_early_exit": dict(assistant_early_exit=1),
        "assistant_lookbehind": dict(assistant_lookbehind=5),
        "target_lookbehind": dict(target_lookbehind=5),
        "assistant_ensemble_weight": dict(assistant_ensemble_weight=0.5),
        "speculation_type": dict(speculation_type="dflash"),
        "compile_config": dict(compile_config=CompileConfig(fullgraph=False)),
        "disable_compile": dict(disable_compile=True),
        "continuous_batching_config": dict(continuous_batching_config=transformers.ContinuousBatchingConfig()),
        "low_memory": dict(low_memory=True),
        # the modes moved to Hub repos need trust_remote_code: unpatched and patched raise the same error
        "penalty_alpha": dict(penalty_alpha=0.6, top_k=4),
        "dola_layers": dict(dola_layers="low"),
        "diversity_penalty": dict(diversity_penalty=0.5, num_beams=2, num_beam_groups=2),
        "num_beam_groups": dict(num_beam_groups=2, num_beams=2),
        "constraints": dict(constraints=[[5, 6]], num_beams=2),
        "force_words_ids": dict(force_words_ids=[[5]], num_beams=2),
        "prefill_chunk_size": dict(prefill_chunk_size=4),
    }


def argument_cases(prompt, model):
    """generate() argument -> generate kwargs using it."""
    n = prompt.shape[1]
    return {
        "inputs": dict(inputs=prompt),
        "input_ids": dict(input_ids=prompt),
        "generation_config": dict(generation_config=GenerationConfig(
            max_new_tokens=9, do_sample=False, repetition_penalty=1.3, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
        "logits_processor": dict(logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.4)])),
        "stopping_criteria": dict(stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(n + 5)])),
        "prefix_allowed_tokens_fn": dict(prefix_allowed_tokens_fn=lambda batch, ids: list(range(3, 60))),
        "synced_gpus": dict(synced_gpus=True),  # no process group: both raise the same error
        "assistant_model": dict(assistant_model=model),  # the patched model assists itself: nested generate calls
        "streamer": dict(streamer="STREAMER"),
        "negative_prompt_ids": dict(negative_prompt_ids=prompt[:, :4], guidance_scale=1.5),
        "negative_prompt_attention_mask": dict(negative_prompt_ids=prompt[:, :4], guidance_scale=1.5,
                                               negative_prompt_attention_mask=torch.ones(1, 4, dtype=torch.long)),
        "custom_generate": dict(custom_generate=lambda model, input_ids, **kwargs: input_ids),
        "tokenizer": dict(tokenizer="TOKENIZER"),
        "assistant_tokenizer": dict(assistant_tokenizer="TOKENIZER", tokenizer="TOKENIZER"),
        "trust_remote_code": dict(trust_remote_code=True),
        "attention_mask": dict(attention_mask=torch.ones_like(prompt)),
        "inputs_embeds": dict(inputs_embeds=model.get_input_embeddings()(prompt).detach()),
        "position_ids": dict(position_ids=torch.arange(n)[None]),
        "token_type_ids": dict(token_type_ids=torch.zeros_like(prompt)),
        "logits_to_keep": dict(logits_to_keep=1),
    }


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def prompt(tok):
    return tok(TEXT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _generate(model, prompt, kwargs, tok):
    """(sequences, scores or None, streamed chunks or None, error or None) of one seeded generate call."""
    # placeholders stand for objects made per call: the tokenizer, a fresh streamer
    made = {"TOKENIZER": lambda: tok, "STREAMER": Recorder}
    kwargs = {k: made[v]() if isinstance(v, str) and v in made else v for k, v in kwargs.items()}
    streamer = kwargs.get("streamer")
    call = dict(max_new_tokens=12, do_sample=False)
    if "generation_config" in kwargs:
        call = {}
    call.update(kwargs)
    args = () if "inputs" in call or "input_ids" in call or "inputs_embeds" in call else (prompt,)
    torch.manual_seed(0)
    try:
        out = model.generate(*args, **call)
    except Exception as exc:  # noqa: BLE001 - compared with the unpatched model's
        return None, None, None, exc
    sequences = out.sequences if hasattr(out, "sequences") else out
    scores = getattr(out, "scores", None)
    return sequences, scores, streamer.chunks if streamer is not None else None, None


def _check(model, prompt, tok, name, kwargs):
    ref, ref_scores, ref_stream, ref_error = _generate(model, prompt, kwargs, tok)
    with hfpatch.patch(model, RECIPE, **RECIPE_ARGS) as handle:
        out, scores, stream, error = _generate(model, prompt, kwargs, tok)
        stats = handle.stats["ngram_lookup"]
    if ref_error is not None:
        # the unpatched model refuses the request: the patched one refuses it the same way
        assert type(error) is type(ref_error) and str(error) == str(ref_error), (name, ref_error, error)
        return
    assert error is None, f"{name}: the patched model raised {error!r}; the unpatched model did not"
    assert torch.equal(out, ref), f"{name}: the patched output differs from the unpatched one"
    assert stream == ref_stream
    if ref_scores is not None:
        assert len(scores) == len(ref_scores)
        for a, b in zip(scores, ref_scores):
            finite = torch.isfinite(b)
            assert torch.equal(finite, torch.isfinite(a))
            torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)
    if name in SERVED_OPTIONS:
        assert stats["fallback"] is None, f"{name} is listed as served but fell back: {stats['fallback']}"
    else:
        assert stats["fallback"] and name in stats["fallback"], (name, stats)


META_PROMPT = torch.zeros(1, 3, dtype=torch.long)
CONFIG_NAMES = sorted(config_cases(META_PROMPT))
ARGUMENT_NAMES = sorted(argument_cases(META_PROMPT, tiny_model("llama")))


def test_every_option_has_a_case_and_one_verdict():
    fields = set(GenerationConfig().to_dict()) - META_FIELDS
    arguments = {name for name, p in inspect.signature(transformers.GenerationMixin.generate).parameters.items()
                 if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    arguments |= {"tokenizer", "assistant_tokenizer", "trust_remote_code"}  # popped from generate's kwargs
    assert not fields - set(CONFIG_NAMES), f"GenerationConfig fields without a case here: {fields - set(CONFIG_NAMES)}"
    assert not arguments - set(ARGUMENT_NAMES), f"generate() arguments without a case: {arguments - set(ARGUMENT_NAMES)}"
    judged = set(SERVED_OPTIONS) | set(FALLBACK_OPTIONS)
    assert not (fields | arguments) - judged, f"options engine.py does not list: {(fields | arguments) - judged}"
    assert not set(SERVED_OPTIONS) & set(FALLBACK_OPTIONS)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_generation_config_field_is_served_or_falls_back(model, prompt, tok, name):
    _check(model, prompt, tok, name, config_cases(prompt)[name])


@pytest.mark.parametrize("name", ARGUMENT_NAMES)
def test_generate_argument_is_served_or_falls_back(model, prompt, tok, name):
    _check(model, prompt, tok, name, argument_cases(prompt, model)[name])


def test_token_healing_with_a_tokenizer_falls_back_and_heals_as_unpatched(model, prompt, tok):
    """The issue's case: token_healing=True with tokenizer= raised "must pass the model's tokenizer"."""
    kwargs = dict(max_new_tokens=10, do_sample=False, token_healing=True, tokenizer=tok)
    healed = []
    heal = model.heal_tokens
    model.heal_tokens = lambda ids, tokenizer=None: healed.append(tokenizer) or heal(ids, tokenizer)
    try:
        ref = model.generate(prompt, **kwargs)
        with hfpatch.patch(model, RECIPE, **RECIPE_ARGS) as handle:
            assert torch.equal(model.generate(prompt, **kwargs), ref)
            assert "token_healing" in handle.stats["ngram_lookup"]["fallback"]
    finally:
        del model.heal_tokens
    assert healed == [tok, tok]  # both calls healed the prompt with the caller's tokenizer


@pytest.mark.parametrize("where", ["keyword", "config object", "model default"])
def test_stop_strings_are_served_wherever_they_are_set(model, prompt, tok, where):
    stop = ["My"]  # the random model writes "hMy" soon after this prompt
    kwargs = dict(max_new_tokens=30, do_sample=False, tokenizer=tok)
    saved = model.generation_config.stop_strings
    if where == "keyword":
        kwargs["stop_strings"] = stop
    elif where == "config object":
        kwargs = dict(tokenizer=tok, generation_config=GenerationConfig(
            max_new_tokens=30, do_sample=False, stop_strings=stop, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    try:
        if where == "model default":
            model.generation_config.stop_strings = stop
        ref = model.generate(prompt, **kwargs)
        with hfpatch.patch(model, RECIPE, **RECIPE_ARGS) as handle:
            out = model.generate(prompt, **kwargs)
            assert handle.stats["ngram_lookup"]["fallback"] is None
    finally:
        model.generation_config.stop_strings = saved
    assert torch.equal(out, ref)
    assert ref.shape[1] < prompt.shape[1] + 30 and tok.decode(ref[0, prompt.shape[1]:]).endswith("My")


def test_modes_that_need_hub_code_are_not_turned_into_greedy(model, prompt):
    """Before: the engine's custom_generate skipped transformers' check, and DoLa / contrastive search /
    constrained beam search quietly ran plain greedy decoding on a patched model."""
    with hfpatch.patch(model, RECIPE, **RECIPE_ARGS) as handle:
        for kwargs in (dict(dola_layers="low"), dict(penalty_alpha=0.6, top_k=4), dict(constraints=[[5]])):
            with pytest.raises(ValueError, match="trust_remote_code"):
                model.generate(prompt, max_new_tokens=5, **kwargs)
            assert handle.stats["ngram_lookup"]["fallback"]


def test_prefill_chunk_size_prefills_in_chunks(model, prompt):
    calls = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                                 with_kwargs=True)
    try:
        with hfpatch.patch(model, RECIPE, **RECIPE_ARGS) as handle:
            model.generate(prompt, max_new_tokens=8, do_sample=False, prefill_chunk_size=4)
            forwards = handle.stats["ngram_lookup"]["forwards"]
    finally:
        hook.remove()
    chunks = -(-prompt.shape[1] // 4)
    assert calls[:chunks] == [4] * (chunks - 1) + [prompt.shape[1] - 4 * (chunks - 1)]
    assert len(calls) == forwards - 1 + chunks


def test_a_positional_generation_config_is_read(model, prompt):
    config = GenerationConfig(max_new_tokens=6, do_sample=False, num_beams=2, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0)
    ref = model.generate(prompt, config)
    with hfpatch.patch(model, RECIPE, **RECIPE_ARGS) as handle:
        assert torch.equal(model.generate(prompt, config), ref)
        assert "num_beams" in handle.stats["ngram_lookup"]["fallback"]
