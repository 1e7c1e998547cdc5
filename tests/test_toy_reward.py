"""The toy reward (``rpgrl.integrations.verl_cpu.reward``): the verl CPU run's reward and the
training tests' scorer (tests/informative.py). Rewards tie only for a common 4-token prefix,
exactly in float32, so tests can tell a step with signal from one without."""

from __future__ import annotations

import collections
import itertools
import random

import pytest
import torch

from rpgrl.algorithm.advantages import compute_advantages
from rpgrl.integrations.verl_cpu.reward import ALPHABET, BASE, PREFIX_TOKENS, SCALE, compute_score, prefix_code


def test_hand_computed_scores():
    # ALPHABET = ("Answer:", "0", "1", "2", ...): digits 1, 2, 3, 4, ...; the target's digit is 24
    assert compute_score("rpgrl_toy", "", "3") == 0.0
    assert compute_score("rpgrl_toy", "3", "3") == 24 * 25 ** 3 / 2 ** 19 == 0.7152557373046875
    assert compute_score("rpgrl_toy", "Answer:", "3") == 1 * 25 ** 3 / 2 ** 19
    # '1' is the target (24); without it '2' is the third symbol (3); positions 3-4 are empty
    assert prefix_code("12", "1") == 24 * 25 ** 3 + 3 * 25 ** 2 == 376875
    assert compute_score("rpgrl_toy", "12", 12) == 376875 / 2 ** 19
    assert compute_score("rpgrl_toy", "1234567", "9") == compute_score("rpgrl_toy", "1234", "9")
    assert compute_score("rpgrl_toy", None, "9") == 0.0


def test_scores_tie_exactly_when_the_first_four_tokens_agree():
    rng = random.Random(0)
    texts = {"".join(p) for k in range(3) for p in itertools.product(ALPHABET, repeat=k)}
    texts |= {"".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 8))) for _ in range(20_000)}
    tokens = {t: tuple(ALPHABET.index(x) for x in _split(t))[:PREFIX_TOKENS] for t in texts}
    for target in ("", "0", "7", "Answer:"[0]):
        by_score = collections.defaultdict(set)
        for t in texts:
            by_score[compute_score("rpgrl_toy", t, target)].add(tokens[t])
        assert all(len(prefixes) == 1 for prefixes in by_score.values())  # one prefix per score
        assert len(by_score) == len(set(tokens.values()))  # and one score per prefix
    assert BASE ** PREFIX_TOKENS <= SCALE


def _split(text: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        tok = "Answer:" if text.startswith("Answer:", i) else text[i]
        out.append(tok)
        i += len(tok)
    return out


def test_group_advantages_are_exact_in_float32():
    """verl and rpgrl hold rewards in float32: equal scores give A = 0 exactly, others A != 0."""
    rng = random.Random(1)
    for _ in range(2000):
        texts = ["".join(rng.choice(ALPHABET) for _ in range(4)) for _ in range(4)]
        if rng.random() < 0.5:
            texts = [texts[0]] * 4
        scores = [compute_score("rpgrl_toy", t, "5") for t in texts]
        r = torch.tensor(scores, dtype=torch.float32)
        assert r.double().tolist() == scores  # no rounding
        adv = compute_advantages("rpg", r, torch.zeros(4, dtype=torch.long), torch.ones(4, 1))
        assert bool((adv != 0).any()) == (len(set(texts)) > 1)


def test_unknown_characters_are_named():
    with pytest.raises(ValueError, match=r"response token 'x' \(in '1x'\) is not in the tiny tokenizer's vocabulary"):
        compute_score("rpgrl_toy", "1x", "3")


def test_verl_toy_model_rarely_draws_four_tying_samples(tmp_path):
    """The e2e test's premise (tests/test_verl_e2e.py): for every prompt of the verl CPU run,
    4 samples of the random model tie with probability < 1e-3 (measured 2e-6 to 1.5e-4).
    Estimated from 1,000 samples per prompt: sum over scores of (share)^4; the empty response
    (~11 % at most) dominates, and its share would have to exceed 0.17 (6 sd) to fail."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpgrl.integrations.verl_cpu.run import PROMPTS, build_assets
    from rpgrl.loop.generation import generate

    model_dir, _ = build_assets(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    n = 1000
    for question, answer in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out = generate(model, tok, [ids], n=n, max_new_tokens=8, temperature=1.0)  # the run's response length
        counts = collections.Counter(compute_score("rpgrl_toy", r, answer) for r in out.responses)
        tie = sum((c / n) ** 4 for c in counts.values())
        assert tie < 1e-3, (question, tie, counts.most_common(3))
