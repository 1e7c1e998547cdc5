"""The procedural math task of the CPU default: two-digit addition, "Answer: N" form.

Rows are built in the same shape as verl parquet rows (docs/math.md §9) so they flow
through the same prompt templating and the same scorer (``rpgrl.rewards``) as AIME/AMC.
Train and test are disjoint over *unordered* operand pairs, so ``a+b`` in the test split
never appears as ``b+a`` in training.
"""

from __future__ import annotations

import random

from rpgrl.data.verl import Example

DATA_SOURCE = "rpgrl/arith"
#: The chat form of the same task for pretrained instruct models (data.task=arith_chat);
#: scored by ``rpgrl.rewards.arith_chat`` (strict "Answer: N" and last-number accuracy).
CHAT_DATA_SOURCE = "rpgrl/arith_chat"
CHAT_PROMPT = "What is {a} + {b}? Reply as: Answer: <number>"
TASKS = ("arith", "arith_chat")


def _example(a: int, b: int, split: str, index: int, task: str = "arith") -> Example:
    chat = task == "arith_chat"
    source = CHAT_DATA_SOURCE if chat else DATA_SOURCE
    content = CHAT_PROMPT.format(a=a, b=b) if chat else f"{a}+{b}"
    return Example(
        messages=[{"role": "user", "content": content}],
        ground_truth=str(a + b),
        data_source=source,
        extra_info={"index": index, "split": split, "raw_problem": f"{a}+{b}"},
        uid=f"{source}/{a}+{b}",
    )


def addition_splits(
    low: int = 10, high: int = 99, test_size: int = 256, seed: int = 1234, task: str = "arith",
) -> tuple[list[Example], list[Example]]:
    """All ordered pairs in [low, high]^2, split disjointly by unordered pair.

    ``seed`` fixes the split only (it is independent of the training seed so every run of
    the default is judged on the same held-out problems). ``task`` picks the prompt form:
    ``arith`` ("37+48", the tiny model's character-level task) or ``arith_chat`` (a chat
    question for pretrained instruct models, see CHAT_PROMPT); ``low``/``high`` are the
    difficulty knob.
    """
    if task not in TASKS:
        raise ValueError(f"procedural task: unknown task {task!r}; allowed: {', '.join(TASKS)}")
    if not 0 <= low <= high:
        raise ValueError(f"procedural task: need 0 <= low <= high, got low={low}, high={high}")
    pairs = sorted({(min(a, b), max(a, b)) for a in range(low, high + 1) for b in range(low, high + 1)})
    rng = random.Random(seed)
    rng.shuffle(pairs)
    train, test = [], []
    for a, b in pairs:
        orders = {(a, b), (b, a)}
        target = test if len(test) < test_size else train
        for x, y in sorted(orders):
            target.append((x, y))
    if not train:
        raise ValueError(f"procedural task: test_size={test_size} leaves no training problems")
    train_ex = [_example(a, b, "train", i, task) for i, (a, b) in enumerate(train)]
    test_ex = [_example(a, b, "test", i, task) for i, (a, b) in enumerate(test)]
    return train_ex, test_ex


def sft_text(example: Example, teacher_accuracy: float = 1.0, rng: random.Random | None = None) -> str:
    """A warm-start target in the exact form the scorer accepts ("Answer:N").

    With ``teacher_accuracy < 1`` the teacher is right only that often and otherwise off
    by one (``a+b+1``): a model that imitates it knows the arithmetic but prefers a wrong
    answer, the situation RL with a verifiable reward is meant to fix (the correct answer
    is sampled often enough to be rewarded, but is not yet the policy's mode).
    """
    answer = int(example.ground_truth)
    if teacher_accuracy < 1.0 and (rng or random).random() >= teacher_accuracy:
        answer += 1
    return f"Answer:{answer}"
