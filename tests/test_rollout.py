"""Rollout layout: right-padded prompt+response, masks, end-of-sequence cut, and target alignment."""

import torch

from tip.models import resolve_model_ref, load_model, load_tokenizer
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
