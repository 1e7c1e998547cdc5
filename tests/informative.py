"""Training tests whose outcome must not depend on which samples are drawn.

Which responses a seeded run samples depends on the CPU's kernels (AVX2 and AVX-512
machines draw differently), so a test may not assume that some group's rewards differ. Two
rules make the training tests hold whatever is drawn:

* The scorer is :data:`PREFIX_RANK` (``rpgrl.integrations.verl_cpu.reward``): two responses
  score alike only if their first 4 tokens agree, so a group's rewards are all equal only if
  its 4 samples share that prefix. For the tests' 30-step warm start that has probability
  ~4e-5 per group (2,000 samples per prompt, 8 prompts). The scorers it replaced (``parity``:
  ~0.2 per group; exact match: most groups of a barely trained model) left whole steps
  without signal.
* An assertion that needs a gradient is stated as what must follow from the drawn batch
  (:func:`check_grad_norms`): the first optimizer step of a batch is on-policy (w = 1, no
  trust-region clipping), so a row with a non-zero advantage among its rows gives it a
  non-zero gradient. Which rows that step takes is a random split, but if more rows have a
  non-zero advantage than the later steps hold, one of them is in the first. With 4 groups
  and 2 mini-batches that fails only if 2 groups tie (~1e-8 per step), so a test that needs it
  in one step of two fails with probability ~1e-16.
"""

from __future__ import annotations

from dataclasses import dataclass

#: rpgrl's tie-free scorer for the tiny tokenizer (a ``reward_fn=`` override).
PREFIX_RANK = "reward_fn=rpgrl.integrations.verl_cpu.reward:compute_score"


@dataclass
class StepBatch:
    """What one trainer step drew: rows, rows with a non-zero advantage, rows of its first optimizer step."""

    step: int
    rows: int
    nonzero_rows: int
    first_update_rows: int

    @property
    def first_update_has_signal(self) -> bool:
        """Some row with A != 0 is certainly in the first (on-policy) optimizer step."""
        return self.nonzero_rows > self.rows - self.first_update_rows


def record_batches(monkeypatch) -> list[StepBatch]:
    """Patch ``Trainer.prepare`` (once per step that drew a batch) to record the step's advantages."""
    from rpgrl.loop.schedule import num_mini_batches
    from rpgrl.loop.trainer import Trainer

    seen: list[StepBatch] = []
    prepare = Trainer.prepare

    def recording(self, batch):
        prepare(self, batch)
        n = batch.advantages.shape[0]
        chunks = num_mini_batches(self.cfg, n)
        seen.append(StepBatch(step=self.state.step + 1, rows=n,
                              nonzero_rows=int((batch.advantages != 0).any(dim=1).sum()),
                              first_update_rows=-(-n // chunks)))  # torch.tensor_split: the first is the largest

    monkeypatch.setattr(Trainer, "prepare", recording)
    return seen


def check_grad_norms(rows: list[dict], seen: list[StepBatch]) -> None:
    """Every logged training step is a step that drew a batch; a step whose first optimizer
    step certainly holds a non-zero advantage logs a gradient norm > 0; at least one does."""
    by_step = {b.step: b for b in seen}
    assert [r["step"] for r in rows] == sorted(by_step), (rows, seen)
    for r in rows:
        if by_step[r["step"]].first_update_has_signal:
            assert r["actor/grad_norm"] > 0, (r, by_step[r["step"]])
    assert any(b.first_update_has_signal for b in seen), f"no step drew a batch with signal: {seen}"
