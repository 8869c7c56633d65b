"""Rollout layout: right-padded prompt+response, masks, end-of-sequence cut, and target alignment."""

import torch

from tip.models import load_model, load_tokenizer, resolve_model_ref
from tip.rollout import hf_generate, pack


def test_pack_marks_response_tokens_and_targets_are_shifted_by_one():
    batch = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], [0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert batch.response_mask.tolist() == [[False, False, False, True, True], [False, True, True, True, False]]
    # Position t predicts token t+1: targets are the positions just before each response token.
    assert batch.target_mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert batch.responses() == [[1, 2], [3, 4, 9]]


def test_split_trims_padding_per_micro_batch():
    batch = pack([[5, 6, 7, 8, 9], [8], [4]], [[1], [3], [2]], [0, 1, 2], pad_id=0)
    parts = batch.split(2)
    assert [p.input_ids.shape for p in parts] == [torch.Size([2, 6]), torch.Size([1, 2])]


def test_hf_generate_cuts_at_eos_and_is_reproducible_greedy():
    tok = load_tokenizer("embedded://student")
    model = load_model("embedded://student", torch.float32, "student")
    prompts = [tok("12+34-5=")["input_ids"], tok("7+8-9=")["input_ids"]]
    a = hf_generate(model, tok, prompts, n=2, temperature=0.0, max_new_tokens=40)
    b = hf_generate(model, tok, prompts, n=2, temperature=0.0, max_new_tokens=40)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.example_index == [0, 0, 1, 1]
    for resp in a.responses():
        assert resp.count(tok.eos_token_id) <= 1 and (tok.eos_token_id not in resp or resp[-1] == tok.eos_token_id)
    text = tok.decode(a.responses()[0], skip_special_tokens=True)
    assert text.startswith("12+34=46;") and "\\boxed{" in text
    assert resolve_model_ref("/some/dir") == "/some/dir"


def instruct_like(model):
    """The model with an Instruct-style generation_config (as Qwen2.5-Instruct's, with harsher values so any
    leak shows): a repetition penalty, an n-gram ban, top-k 1, a low temperature and a minimum length."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=model.generation_config.bos_token_id, eos_token_id=model.generation_config.eos_token_id,
        repetition_penalty=3.0, no_repeat_ngram_size=2, top_k=1, top_p=0.5, temperature=0.1, min_new_tokens=30,
        do_sample=True)
    return model


def test_rollouts_ignore_the_models_generation_config():
    """Rollouts are samples of P_S: the processors an Instruct model's generation_config switches on (repetition
    penalty, ...) and transformers' default top-k of 50 must not act. Same seed, same tokens, whatever the
    model's generation_config says; and the config is restored afterwards."""
    tok = load_tokenizer("embedded://student")
    plain = load_model("embedded://student", torch.float32, "student")
    dressed = instruct_like(load_model("embedded://student", torch.float32, "student"))
    prompts = [tok(p)["input_ids"] for p in ("12+34-5=", "7+8-9=", "61-19+3=")]
    for temperature in (0.0, 1.0):
        torch.manual_seed(7)
        a = hf_generate(plain, tok, prompts, n=3, temperature=temperature, max_new_tokens=40)
        torch.manual_seed(7)
        b = hf_generate(dressed, tok, prompts, n=3, temperature=temperature, max_new_tokens=40)
        assert a.responses() == b.responses(), temperature
    assert dressed.generation_config.repetition_penalty == 3.0


def test_sampled_rollouts_follow_the_students_distribution():
    """The first sampled token's frequencies match softmax(logits) at temperature 1 (no top-k 50, no penalties):
    a model with a flat first step over many tokens would be cut to 50 by transformers' default top-k."""
    tok = load_tokenizer("embedded://student")
    model = instruct_like(load_model("embedded://student", torch.float32, "student"))
    prompt = tok("12+34-5=")["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
    torch.manual_seed(0)
    batch = hf_generate(model, tok, [prompt], n=4000, temperature=1.0, max_new_tokens=1)
    first = torch.tensor([r[0] for r in batch.responses()])
    freq = torch.bincount(first, minlength=probs.numel()).double() / first.numel()
    top = probs.argsort(descending=True)[:3]
    # Binomial standard error at n=4000 is <= 0.008; 0.03 is ~4 SE.
    torch.testing.assert_close(freq[top], probs[top], atol=0.03, rtol=0)


def test_generation_is_split_into_calls_of_at_most_max_seqs():
    """One generate call holds the KV cache of all its sequences: paper evaluation (16 problems x 16 samples)
    and a rank's rollouts went to one call. Capped calls give the same greedy rollouts."""
    tok = load_tokenizer("embedded://student")
    model = load_model("embedded://student", torch.float32, "student")
    prompts = [tok(p)["input_ids"] for p in ("12+34-5=", "7+8-9=", "61-19+3=", "50-25+5=", "9+9-9=")]
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    capped = hf_generate(model, tok, prompts, n=2, temperature=0.0, max_new_tokens=40, max_seqs_per_call=4)
    assert max(batch_sizes) == 4 and 2 in batch_sizes  # 5 prompts x 2 = 10 sequences: 4 + 4 + 2
    hook.remove()
    whole = hf_generate(model, tok, prompts, n=2, temperature=0.0, max_new_tokens=40)
    assert capped.responses() == whole.responses() and capped.example_index == whole.example_index


def test_a_prompts_samples_are_split_when_the_cap_is_below_them():
    """eval.max_seqs_per_generate below the samples per prompt used to be ignored (a prompt's 16 samples went to
    one call whatever the cap): the Llama overlay's cap of 8 did nothing. The calls now hold at most the cap, and
    the rollouts do not depend on it (greedy, prompt by prompt, samples in order)."""
    tok = load_tokenizer("embedded://student")
    model = load_model("embedded://student", torch.float32, "student")
    prompts = [tok(p)["input_ids"] for p in ("12+34-5=", "7+8-9=")]
    outs = {}
    for cap in (None, 5, 3, 1):
        calls = []
        hook = model.register_forward_pre_hook(  # every forward: the sequences of its call
            lambda m, args, kwargs, calls=calls: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
        outs[cap] = hf_generate(model, tok, prompts, n=5, temperature=0.0, max_new_tokens=20, max_seqs_per_call=cap)
        hook.remove()
        assert max(calls) <= (cap or 10), (cap, calls)
        assert outs[cap].example_index == [0] * 5 + [1] * 5
    assert all(o.responses() == outs[None].responses() for o in outs.values())


def test_rollouts_of_a_checkpointed_model_in_training_mode_are_its_greedy_answers():
    """With activation checkpointing in training mode transformers drops the KV cache and then feeds the model
    only its newest token: rollouts were 40 tokens of garbage. Generation runs in eval mode."""
    tok = load_tokenizer("embedded://student")
    model = load_model("embedded://student", torch.float32, "student")
    prompts = [tok(p)["input_ids"] for p in ("12+34-5=", "7+8-9=", "61-19+3=")]
    plain = hf_generate(model, tok, prompts, temperature=0.0, max_new_tokens=40).responses()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert hf_generate(model, tok, prompts, temperature=0.0, max_new_tokens=40).responses() == plain
    assert model.training  # restored
