"""The vLLM rollout backend (``rollout=vllm``): a vLLM engine in a worker process (the trainer's
handle ``tip.vllm_worker.VllmWorker``; the process runs ``tip/vllm_server.py``), fed the student's
weights after every optimizer step, and the evaluation sampler through the same engine.

Under ZeRO-3 each parameter is gathered alone, sent, and released: the whole model is never gathered
at once (the known out-of-memory trap of weight syncing). The engine is never restarted.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from tip.env import SampledTurn
from tip.rollout import RolloutBatch
from tip.vllm_worker import VllmWorker


class VllmRollout:
    """rollout=vllm for the trainer: a worker (``VllmWorker``) sampling with one seed per prompt,
    and the student's weights sent to it after every optimizer step (``sync``)."""

    def __init__(self, engine: VllmWorker, student, tokenizer, rollout_cfg):
        self.engine, self.student = engine, student
        self.tokenizer, self.cfg = tokenizer, rollout_cfg

    def generate(self, prompt_ids: list[list[int]], step_seed: int, prompt_seeds: list[int],
                 examples=None, n: int | None = None) -> RolloutBatch:
        """``n`` (default ``rollout.n``) samples of each prompt; sample j of a prompt from its
        seed + j."""
        ro = self.cfg
        self.resend_lost_weights()
        return self.engine.generate(self.tokenizer, prompt_ids, n=n or ro.n,
                                    temperature=ro.temperature,
                                    top_p=ro.top_p, top_k=ro.top_k,
                                    max_new_tokens=ro.max_new_tokens, seeds=prompt_seeds,
                                    model=self.student, logprobs=True)

    @contextmanager
    def turns(self):
        """A turn generator for multi-turn episodes (``tip.env.TurnGenerator``): one engine request
        per round over every running episode, each context with its own seed; the engine stays
        awake from the first round to the last."""
        self.resend_lost_weights()
        try:  # (the rollout settings carry the sampling fields EngineSampler.turns reads)
            with EngineSampler(self.engine, self.tokenizer, self.student,
                               seeded=True).turns(self.cfg) as turn:
                yield turn
        finally:
            self.engine.sleep()

    def resend_lost_weights(self) -> None:
        """Send the student's weights again if the engine discarded them (a level-2 sleep since the
        last sync): every sampling request then finds the current weights."""
        if self.engine.weights_lost:
            self.engine.load_weights(self.student)

    def eval_sampler(self) -> EngineSampler:
        """Evaluation through this engine (``tip.benchmarks.evaluate``) from the current weights."""
        self.resend_lost_weights()
        return EngineSampler(self.engine, self.tokenizer, self.student)

    def sync(self) -> dict:
        """Send the student's current weights; returns the seconds it took and the memory at each
        wake-up of the engine since the last sync (``VllmWorker.wake_log``)."""
        start = time.time()
        self.engine.load_weights(self.student)
        return {"weight_sync_s": round(time.time() - start, 3), **self.engine.take_wake_log()}

    def close(self) -> None:
        self.engine.close()


class EngineSampler:
    """A benchmark's generation through a vLLM engine (``tip.benchmarks.Sampler``): each rank's
    problems in one request, the engine awake from the first request to ``done()``. ``model``:
    where the end-of-sequence ids are read (its ``generation_config``), as for rollouts.

    Evaluation requests carry no per-prompt seed: a request with its own seed is sampled row by row
    in Python at every decode step (about 1,000 running sequences a rank on MATH-500), one without
    stays on vLLM's batched sampler. The samples are reproducible through the engine's own seed
    (the run's ``seed``, given at its start; rollouts, which keep per-prompt seeds, do not draw from
    it): the same run, with the same requests in the same order, samples the same. Unlike a
    rollout, a problem's samples then depend on the batch it was in."""

    lockstep = False  # each rank's engine is its own: no rank waits for another's requests

    def __init__(self, engine: VllmWorker, tokenizer, model, seeded: bool = False):
        # seeded: each context its own seed (a rollout's episodes); evaluation: none
        self.engine, self.tokenizer, self.model, self.seeded = engine, tokenizer, model, seeded

    def samples(self, prompt_ids: list[list[int]], n: int, sampling, seeds: list[int]):
        return self.engine.generate(self.tokenizer, prompt_ids, n=n,
                                    temperature=sampling.temperature, top_p=sampling.top_p,
                                    top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens,
                                    seeds=None, model=self.model, sleep_after=False)

    @contextmanager
    def turns(self, sampling):
        def generate_turn(contexts, seeds, max_new_tokens):
            batch = self.engine.generate(self.tokenizer, contexts, n=1,
                                         temperature=sampling.temperature, top_p=sampling.top_p,
                                         top_k=sampling.top_k, max_new_tokens=max_new_tokens,
                                         seeds=seeds if self.seeded else None, model=self.model,
                                         sleep_after=False, logprobs=self.seeded)
            if batch.sampler_logp is None:
                return batch.responses()
            return [SampledTurn(r, batch.sampler_logp[i, start:start + len(r)].tolist())
                    for i, (r, start) in enumerate(zip(batch.responses(), batch.prompt_lengths))]

        yield generate_turn

    def done(self) -> None:
        self.engine.sleep()


