"""Generation: greedy = argmax of full forwards, batching, stop strings, overflow, CLI."""

from __future__ import annotations

import gc
import io

import mlx.core as mx
import numpy as np
import pytest
from test_model import CONFIGS, random_model, tiny_config

from mlx_transformer.checkpoint.mlx_io import save_checkpoint
from mlx_transformer.cli import main
from mlx_transformer.errors import UserError
from mlx_transformer.generate import decode
from mlx_transformer.generate.api import (
    ContextOverflowError,
    StopStrings,
    batch_generate,
    batch_generate_step,
    generate,
    generate_step,
    partial_stop_length,
    stream_generate,
)
from mlx_transformer.generate.decode import (
    DynamicCacheDecoder,
    StaticCacheDecoder,
    compiled_step,
    left_pad,
    prefill,
)
from mlx_transformer.generate.sample import make_logits_processors, make_sampler
from mlx_transformer.tokenizer import Tokenizer

LLAMA = CONFIGS["llama-gqa"]
PROMPTS = [[5, 9, 2, 7, 7, 1, 30, 4, 11], [3], [8, 8, 12, 40, 2]]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_path)


@pytest.fixture(scope="module")
def text_model(tokenizer):
    config = tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, **LLAMA)
    return random_model(config, seed=3)


def full_forward_greedy(model, prompt, n):
    """The reference: n greedy tokens, each from a full forward pass without cache."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(mx.array([ids]))
        ids.append(int(mx.argmax(logits[0, -1]).item()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "paper"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_greedy_is_argmax_of_full_forward_at_every_step(name, compiled):
    model = random_model(tiny_config(**CONFIGS[name]), seed=1)
    prompt = PROMPTS[0]
    got = list(generate_step(prompt, model, max_tokens=12, compiled=compiled))
    assert got == full_forward_greedy(model, prompt, 12)


@pytest.mark.parametrize("grow_by", [128, 3])
def test_compiled_static_cache_logits_equal_dynamic_cache_logits(grow_by):
    """Padded rows, and (grow_by 3) buffers that grow twice on the way to their capacity."""
    model = random_model(tiny_config(**LLAMA), seed=2)
    ids, mask = left_pad(PROMPTS)
    B, L = ids.shape
    prefix = mask[:, :-1]
    cache = prefill(model, ids[:, :-1], prefix)
    static = StaticCacheDecoder(model, cache, prefix, L + 6, B, grow_by=grow_by)
    dynamic = DynamicCacheDecoder(model, prefill(model, ids[:, :-1], prefix), prefix)
    y = ids[:, -1]
    for _ in range(6):
        a, b = static(y), dynamic(y)
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)
        y = mx.argmax(a, axis=-1)
    assert static.keys[0].shape[2] == L + 6  # grown to the capacity, never past it


def test_compiled_step_is_reused_but_follows_new_weights():
    model = random_model(tiny_config(**LLAMA), seed=2)
    assert compiled_step(model) is compiled_step(model)
    first = list(generate_step(PROMPTS[0], model, max_tokens=6))
    model.update(random_model(tiny_config(**LLAMA), seed=9).parameters())  # e.g. a training step
    after = list(generate_step(PROMPTS[0], model, max_tokens=6))
    assert after == full_forward_greedy(model, PROMPTS[0], 6) and after != first
    key = id(model)
    del model
    gc.collect()
    assert key not in decode._COMPILED


def test_compiled_step_follows_the_ops_choice():
    """The trace fixes which kernels `ops` picked: turning the CPU kernels off (or moving to
    another device) must not reuse a step traced with them."""
    from mlx_transformer import ops

    model = random_model(tiny_config(**LLAMA), seed=2)
    with ops.use_cpu_kernels(True):
        first = compiled_step(model)
    with ops.use_cpu_kernels(False):
        assert compiled_step(model) is not first
        assert list(generate_step(PROMPTS[0], model, max_tokens=6)) == full_forward_greedy(
            model, PROMPTS[0], 6
        )


def test_chunked_prefill_equals_one_pass():
    model = random_model(tiny_config(**LLAMA), seed=2)
    one = list(generate_step(PROMPTS[0], model, max_tokens=6))
    chunked = list(generate_step(PROMPTS[0], model, max_tokens=6, prefill_step_size=2))
    assert one == chunked


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_batched_greedy_equals_each_prompt_alone(compiled):
    model = random_model(tiny_config(**LLAMA), seed=4)
    batch = list(batch_generate_step(PROMPTS, model, max_tokens=10, compiled=compiled))
    for b, prompt in enumerate(PROMPTS):
        alone = list(generate_step(prompt, model, max_tokens=10, compiled=compiled))
        assert [step[b] for step in batch] == alone


def test_batched_repetition_penalty_ignores_padding():
    model = random_model(tiny_config(**LLAMA), seed=4)
    processors = make_logits_processors(repetition_penalty=1.5)
    kwargs = dict(max_tokens=8, logits_processors=processors)
    batch = list(batch_generate_step(PROMPTS, model, **kwargs))
    for b, prompt in enumerate(PROMPTS):
        assert [step[b] for step in batch] == list(generate_step(prompt, model, **kwargs))


def test_same_seed_same_tokens():
    model = random_model(tiny_config(**LLAMA), seed=5)

    def sample(seed):
        sampler = make_sampler(temp=1.5, top_k=20, seed=seed)
        return list(generate_step(PROMPTS[0], model, max_tokens=15, sampler=sampler))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_prompt_ids_outside_the_vocabulary_are_refused():
    """MLX does not bound-check embedding look-ups: an id past the table reads garbage, or
    crashes the process (SIGSEGV) when it is far past."""
    model = random_model(tiny_config(**LLAMA), seed=1)  # vocab 61
    for bad in (61, 10**6, -1):
        with pytest.raises(ValueError, match="outside the model's vocabulary 0..60"):
            batch_generate_step([[5, bad]], model, max_tokens=2)


# -- KV cache memory -------------------------------------------------------------------------------


def test_kv_cache_size_is_what_the_decoder_allocates():
    """The memory check counts exactly the buffers StaticCacheDecoder makes."""
    from mlx_transformer.generate.rules import kv_cache_bytes

    model = random_model(tiny_config(**LLAMA), seed=1)
    ids, mask = left_pad(PROMPTS)
    B, L = ids.shape
    decoder = StaticCacheDecoder(
        model, prefill(model, ids[:, :-1], mask[:, :-1]), mask[:, :-1], capacity=L + 7, batch_size=B
    )
    allocated = sum(k.nbytes + v.nbytes for k, v in zip(decoder.keys, decoder.values))
    c = model.config
    assert allocated == kv_cache_bytes(
        c.num_hidden_layers, c.num_key_value_heads, c.head_dim, B, L + 7, 4
    )


def test_a_kv_cache_past_memory_is_refused_before_allocating():
    from mlx_transformer.generate.rules import check_kv_cache_fits

    with pytest.raises(
        UserError,
        match=r"for 1,000 tokens x 3 prompts would need 2.0 GB and "
        r"1.0 GB of memory is available; lower --max-tokens",
    ):
        check_kv_cache_fits(2 * 10**9, 1000, 3, available=10**9)
    check_kv_cache_fits(10**9, 1000, 1, available=10**9)  # fits exactly
    check_kv_cache_fits(10**18, 1000, 1, available=None)  # unknown: not refused
    # A model claiming a long context (rotary: no table to store), and a request to fill it:
    # 2 layers x 2 x 2 heads x 4096 dims x 4 bytes = 128 KiB per token, 2**27 tokens, 2 rows.
    config = tiny_config(**LLAMA, head_dim=4096, max_position_embeddings=2**27)
    model = random_model(config, seed=1)
    with pytest.raises(
        UserError,
        match=r"KV cache for 134,217,728 tokens x 2 prompts would need "
        r"35.2 TB",
    ):
        batch_generate_step([[1, 2], [3]], model, max_tokens=10**12, overflow="slide")


# -- context overflow ------------------------------------------------------------------------------


def test_overflow_is_a_one_line_error_by_default():
    model = random_model(tiny_config(**LLAMA), seed=1)  # context 48
    with pytest.raises(ContextOverflowError) as e:
        generate_step(list(range(1, 41)), model, max_tokens=9)
    assert str(e.value).count("\n") == 0
    for part in ("40 tokens", "max_tokens (9)", "49", "context of 48", "--overflow slide"):
        assert part in str(e.value)
    assert len(list(generate_step(list(range(1, 41)), model, max_tokens=8))) == 8  # fits exactly


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_overflow_slide_keeps_the_last_half_context(compiled):
    model = random_model(tiny_config(**LLAMA), seed=1)  # context 48: keep 24 when sliding
    prompt = [(7 * i) % 60 + 1 for i in range(40)]
    got = list(generate_step(prompt, model, max_tokens=30, overflow="slide", compiled=compiled))
    assert len(got) == 30
    assert got[:8] == full_forward_greedy(model, prompt, 8)  # the first window: 40 + 8 = 48
    window = (prompt + got[:8])[-24:]  # then the last 24 tokens are prefilled again
    assert got[8:30] == full_forward_greedy(model, window, 22)


def test_slide_cuts_a_prompt_longer_than_the_context():
    model = random_model(tiny_config(**LLAMA), seed=1)
    prompt = [(3 * i) % 60 + 1 for i in range(100)]
    got = list(generate_step(prompt, model, max_tokens=5, overflow="slide"))
    assert got == full_forward_greedy(model, prompt[-24:], 5)


# -- stop strings ----------------------------------------------------------------------------------


def test_partial_stop_length():
    assert partial_stop_length("hello wor", ["world"]) == 3
    assert partial_stop_length("hello", ["world"]) == 0
    assert partial_stop_length("aa", ["aab", "x"]) == 2


def test_stop_strings_spanning_pieces_stop_before_the_stop_string():
    stops = StopStrings(["END", "xyz"])
    shown = [stops.add(p) for p in ["ab", "cE", "N", "Dtail"]]
    assert shown == ["ab", "c", "", ""]
    assert stops.stopped and stops.text == "abc"


def test_stop_strings_release_held_text_that_turned_out_not_to_stop():
    stops = StopStrings(["END"])
    assert [stops.add(p) for p in ["aE", "Nb", "cE"]] == ["a", "ENb", "c"]
    assert stops.flush() == "E" and not stops.stopped


def test_stream_generate_stops_at_a_stop_string_across_tokens(text_model, tokenizer):
    full = list(generate_step(tokenizer.encode("The king"), text_model, max_tokens=40))
    pieces = [tokenizer.decode(full[:i]) for i in range(len(full) + 1)]
    text = pieces[-1]
    # a stop string that starts inside one token's text and ends inside a later one
    i = next(i for i in range(2, len(full)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    start = len(pieces[i]) - 1
    stop = text[start : start + 4]
    assert len(stop) == 4 and text.find(stop) == start
    responses = list(stream_generate(text_model, tokenizer, "The king", max_tokens=40, stop=[stop]))
    assert "".join(r.text for r in responses) == text[:start]
    assert responses[-1].finish_reason == "stop"
    assert generate(text_model, tokenizer, "The king", max_tokens=40) == text


def test_eos_stops_generation(text_model, tokenizer):
    processors = make_logits_processors(logit_bias={tokenizer.eos_id: 1e4})
    responses = list(
        stream_generate(text_model, tokenizer, "a", max_tokens=10, logits_processors=processors)
    )
    assert "".join(r.text for r in responses) == ""
    assert responses[-1].finish_reason == "stop" and responses[-1].generation_tokens == 1


def forcing(sequence, prompt_len):
    """A logits processor that makes the model say `sequence`, token after token."""

    def processor(history, logits):
        i = history.shape[1] - prompt_len
        return logits.at[:, sequence[min(i, len(sequence) - 1)]].add(1e4)

    return [processor]


def test_multibyte_characters_are_never_half_printed(text_model, tokenizer):
    target = tokenizer.encode("né ☃ ok 日本")
    assert any(tokenizer.id_to_piece(t).startswith("<0x") for t in target)  # byte fallback
    prompt = tokenizer.encode("a")
    responses = list(
        stream_generate(
            text_model,
            tokenizer,
            prompt,
            max_tokens=len(target),
            logits_processors=forcing(target, len(prompt)),
        )
    )
    assert [r.token for r in responses[:-1]] == target
    assert "".join(r.text for r in responses) == "né ☃ ok 日本"
    assert all("\ufffd" not in r.text for r in responses)


def test_empty_prompt_starts_from_eos_and_whitespace_prompt_works(text_model, tokenizer):
    # Documents are separated by EOS in training: an empty prompt is "a new document starts".
    bos_alone = list(generate_step([tokenizer.eos_id], text_model, max_tokens=6))
    out = list(stream_generate(text_model, tokenizer, "", max_tokens=6))
    assert [r.token for r in out[:-1]] == bos_alone and out[-1].prompt_tokens == 1
    spaces = list(stream_generate(text_model, tokenizer, "   ", max_tokens=6))
    assert spaces[-1].prompt_tokens == len(tokenizer.encode("   ")) >= 1
    assert spaces[-1].generation_tokens == 6 and spaces[-1].finish_reason == "length"


def test_batch_generate_equals_generate_per_prompt(text_model, tokenizer):
    prompts = ["The king", "O", "What say you, my lord?"]
    result = batch_generate(text_model, tokenizer, prompts, max_tokens=12, stop=["\n"])
    for prompt, text in zip(prompts, result.texts):
        assert text == generate(text_model, tokenizer, prompt, max_tokens=12, stop=["\n"])
    assert result.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert result.generation_tps > 0 and result.prompt_tps > 0


# -- command line ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, text_model, tiny_tokenizer_path):
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    return save_checkpoint(path, text_model, tokenizer_path=tiny_tokenizer_path)


def test_cli_prints_text_and_speed(checkpoint, text_model, tokenizer, capsys):
    rc = main(["generate", "--model", str(checkpoint), "--prompt", "The king", "--max-tokens", "9"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == generate(text_model, tokenizer, "The king", max_tokens=9) + "\n"
    assert "prompt:" in err and "tokens/s" in err and "peak memory" in err


def test_cli_reads_the_prompt_from_stdin(checkpoint, monkeypatch, capsys, text_model, tokenizer):
    def stdin(data: bytes):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))

    stdin(b"The king")
    args = ["generate", "--model", str(checkpoint), "--prompt", "-", "--max-tokens", "5"]
    args += ["--temp", "0.8", "--top-p", "0.9", "--seed", "1", "--repetition-penalty", "1.2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    stdin(b"The king")
    assert main(args) == 0 and capsys.readouterr().out == first  # same seed, same text
    monkeypatch.setattr("sys.stdin", io.StringIO("The king"))  # a stdin without bytes
    assert main(args) == 0 and capsys.readouterr().out == first


def test_cli_refuses_a_prompt_past_64_mib_on_stdin(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a" * (64 * 2**20 + 1))))
    rc = main(["generate", "--model", str(checkpoint), "--prompt", "-", "--max-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "over 64 MiB" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temp", "-1"], "temperature"),
        (["--top-p", "1.5"], "top-p"),
        (["--top-k", "-3"], "top-k"),
        (["--max-tokens", "-1"], "max-tokens"),
        (["--repetition-penalty", "0"], "repetition penalty"),
        (["--max-tokens", "500"], "--overflow slide"),
    ],
)
def test_cli_bad_values_are_one_line_errors(checkpoint, capsys, flags, message):
    rc = main(["generate", "--model", str(checkpoint), "--prompt", "hi", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_cli_missing_checkpoint(tmp_path, capsys):
    rc = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and err.count("\n") == 1
