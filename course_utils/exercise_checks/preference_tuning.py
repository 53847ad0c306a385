"""Checks for the exercises of lesson 13 (preference tuning, DPO): rewards, log-probs, loss, trainer."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from trl import DPOTrainer

from course_utils import assets, memory, preference
from course_utils.exercise_checks.feedback import allclose, exercise, expect, isclose
from course_utils.exercise_checks.trainer_settings import plain_run_settings, quiet

#: Bound at import, like feedback's comparisons.
_is_tensor = torch.is_tensor
_isfinite = torch.isfinite
_grad = torch.autograd.grad
_logsigmoid = torch.nn.functional.logsigmoid
_sigmoid = torch.sigmoid
_log_softmax = torch.log_softmax
REPORT_KEYS = ("chosen", "rejected", "margins", "margin", "accuracy")


def visible_logps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The visible tests' log-probabilities of 8 pairs: policy chosen, policy rejected,
    reference chosen, reference rejected (fresh tensors at each call)."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-40 - 10 * torch.rand(8, generator=g) for _ in range(4))
    return pc, pr, rc, rr


# --------------------------------------------------------------------------------------------
# Exercise 1: reward_report.
# --------------------------------------------------------------------------------------------


def _check_report(reward_report, pc, pr, rc, rr, beta) -> dict:
    """Compare reward_report with course_utils.preference; explain a mismatch."""
    got = reward_report(pc, pr, rc, rr, beta)
    expect(
        isinstance(got, dict),
        f"reward_report returned {type(got).__name__}, not a dict. Hint: return a dict with the "
        "keys 'chosen', 'rejected', 'margins', 'margin' and 'accuracy'.",
    )
    missing = set(REPORT_KEYS) - set(got)
    expect(not missing, f"the dict lacks {sorted(missing)}. Hint: return all five keys.")
    chosen = preference.implicit_rewards(pc, rc, beta)
    rejected = preference.implicit_rewards(pr, rr, beta)
    margins = chosen - rejected
    for key, expected in (("chosen", chosen), ("rejected", rejected), ("margins", margins)):
        value = got[key]
        expect(
            _is_tensor(value) and value.shape == expected.shape,
            f"got[{key!r}] must be a tensor of shape {tuple(expected.shape)}. "
            "Hint: compute element by element, one value per pair.",
        )
        if allclose(value, expected, atol=1e-6):
            continue
        hint = (
            "each reward is the policy's log-probability minus the reference's, scaled by beta, "
            "for chosen and rejected separately."
        )
        if allclose(value, expected / beta, atol=1e-6):
            hint = "the log-ratio is not scaled by beta."
        elif key == "margins" and allclose(value, -margins, atol=1e-6):
            hint = "the sign is flipped: the margin is the chosen reward minus the rejected one."
        shown = [round(v, 4) for v in value.tolist()]
        expect(False, f"got[{key!r}] is {shown}, wrong (beta={beta:g}). Hint: {hint}")
    margin = margins.mean().item()
    expect(
        isinstance(got["margin"], float)
        and isclose(got["margin"], margin, rel_tol=1e-6, abs_tol=1e-7),
        f"margin is {got['margin']!r}, expected {margin:.6g}. "
        "Hint: the mean of the margins, as a Python float, not a tensor.",
    )
    accuracy = (margins > 0).float().mean().item()
    if not (isinstance(got["accuracy"], float) and isclose(got["accuracy"], accuracy)):
        hint = "the share of pairs with a positive margin, as a Python float between 0 and 1."
        if isclose(float(got["accuracy"]), (margins >= 0).float().mean().item()):
            hint = "a tie (margin exactly 0) is not a win: count the strictly positive margins."
        expect(False, f"accuracy is {got['accuracy']!r}, expected {accuracy}. Hint: {hint}")
    if bool((margins == 0).all()):  # the policy is its reference: exactly 0, not about 0
        expect(
            got["accuracy"] == 0.0 and got["margin"] == 0.0,
            f"with every margin 0 the margin is {got['margin']!r} and the accuracy "
            f"{got['accuracy']!r}, not exactly 0. Hint: a tie is not a win.",
        )
    return got


@exercise(1, "reward_report")
def reward_report(reward_report, cases=None) -> str:
    """Exercise 1: reward_report against preference.implicit_rewards.

    `cases` is a list of (policy_chosen, policy_rejected, reference_chosen, reference_rejected,
    beta); without it, the visible test.
    """
    if cases is not None:
        for case in cases:
            _check_report(reward_report, *case)
        return ""
    pc, pr, rc, rr = visible_logps()
    report = _check_report(reward_report, pc, pr, rc, rr, 0.1)
    _check_report(reward_report, pc, pr, rc, rr, 0.5)
    return "\n".join(
        (
            f"margins {[round(m, 3) for m in report['margins'].tolist()]}",
            f"mean margin {report['margin']:.3f}, accuracy {report['accuracy']:.0%}",
            f"before training the policy is the reference: {reward_report(rc, rr, rc, rr, 0.1)}",
        )
    )


# --------------------------------------------------------------------------------------------
# Exercise 2: answer_logp.
# --------------------------------------------------------------------------------------------


def _wrong_sums(model, tokenizer, prompt, completion) -> tuple[dict[str, float], int]:
    """The value of each usual mistake, keyed by its hint; the number of answer tokens."""
    template = tokenizer.apply_chat_template
    n_prompt = len(
        template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    ids = list(template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    following = torch.tensor(ids[1:])[:, None]
    per_token = _log_softmax(logits[:-1], -1).gather(-1, following).squeeze(-1)
    unshifted = _log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
    raw = logits[:-1].gather(-1, following).squeeze(-1)
    answer = per_token[n_prompt - 1 :]
    return {
        "the prompt's tokens are in the sum: keep only the answer's.": per_token.sum().item(),
        "that is the mean over the answer's tokens: the log-probability is their sum.": (
            answer.mean().item()
        ),
        "the sum starts one token late and misses the answer's first token: it is predicted "
        "by the logits at the prompt's last position.": per_token[n_prompt:].sum().item(),
        "the logits are not shifted: the logits at position t predict token t + 1, not "
        "token t.": unshifted[n_prompt:].sum().item(),
        "raw logits are not log-probabilities: normalize them with a log-softmax first.": (
            raw[n_prompt - 1 :].sum().item()
        ),
    }, len(answer)


def _check_logp(answer_logp, tokenizer, model, prompt, completion) -> float:
    """Compare answer_logp with preference.completion_logps; explain a mismatch."""
    got = answer_logp(model, tokenizer, prompt, completion)
    expect(
        isinstance(got, float),
        f"answer_logp returned {type(got).__name__}, not a float. "
        "Hint: turn the 0-d tensor into a Python float.",
    )
    expected = preference.completion_logps(model, tokenizer, [prompt], [completion])[0].item()
    if isclose(got, expected, rel_tol=1e-5, abs_tol=1e-4):
        return got
    wrong, n_answer = _wrong_sums(model, tokenizer, prompt, completion)
    hint = (
        "check each step of the recipe: the shift by one, the log-softmax, the next tokens, and "
        "the answer's positions only."
    )
    for text, value in wrong.items():
        if isclose(got, value, rel_tol=1e-5, abs_tol=1e-4):
            hint = text
            break
    expect(
        False,
        f"answer_logp is {got:.4f}, expected {expected:.4f} ({n_answer} answer tokens). "
        f"Hint: {hint}",
    )


@exercise(2, "answer_logp")
def answer_logp(answer_logp, tokenizer, pairs, cases=None) -> str:
    """Exercise 2: answer_logp against preference.completion_logps.

    `cases` is a list of (model, prompt, completion); without it, the visible test: the chosen
    and rejected answers of the first pair under tiny_llama(seed=0).
    """
    if cases is not None:
        for model, prompt, completion in cases:
            _check_logp(answer_logp, tokenizer, model, prompt, completion)
        return ""
    policy = assets.tiny_llama(tokenizer, seed=0).eval()
    for key in ("chosen", "rejected"):
        _check_logp(answer_logp, tokenizer, policy, pairs[0]["prompt"], pairs[0][key])
    lines = []
    for pair in pairs[:3]:
        chosen, rejected = (
            answer_logp(policy, tokenizer, pair["prompt"], pair[key])
            for key in ("chosen", "rejected")
        )
        lines.append(
            f"{pair['mistake']:>22}: log pi(chosen) {chosen:8.2f}  log pi(rejected) {rejected:8.2f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Exercise 3: dpo_loss and dpo_pair_weights.
# --------------------------------------------------------------------------------------------


def _margins(pc, pr, rc, rr, beta) -> torch.Tensor:
    """The reward margins, from the course's implicit_rewards."""
    return preference.implicit_rewards(pc, rc, beta) - preference.implicit_rewards(pr, rr, beta)


def _check_loss(dpo_loss, pc, pr, rc, rr, beta):
    """Compare dpo_loss with preference.dpo_loss, value and gradient; return the right gradients."""
    pc, pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    got = dpo_loss(pc, pr, rc, rr, beta)
    expect(
        _is_tensor(got) and got.dim() == 0,
        "dpo_loss must return a 0-d tensor. Hint: average over the pairs and keep it a tensor.",
    )
    margins = _margins(pc, pr, rc, rr, beta).detach()
    expect(
        bool(_isfinite(got)),
        f"dpo_loss is {got.item()} for margins down to {margins.min().item():.0f}. "
        "Hint: log(sigmoid(m)) underflows for very negative m; use the stable log-sigmoid of "
        "the text.",
    )
    expected = preference.dpo_loss(pc, pr, rc, rr, beta)
    if not allclose(got, expected, rtol=1e-5, atol=1e-6):
        hint = "compare each step with the formula of the text: margins, log-sigmoid, mean, sign."
        for wrong, text in (
            (-_logsigmoid(margins).sum(), "that is the sum over the pairs; the loss is the mean."),
            (-_logsigmoid(margins / beta).mean(), "the log-ratios are not scaled by beta."),
            (
                -_logsigmoid(-margins).mean(),
                "the margin has the wrong sign: it is the chosen reward minus the rejected one.",
            ),
            (_logsigmoid(margins).mean(), "the sign is flipped: the loss is MINUS log sigma(m)."),
        ):
            if allclose(got.detach(), wrong, rtol=1e-5, atol=1e-6):
                hint = text
                break
        expect(
            False,
            f"dpo_loss is {got.item():.6f}, expected {expected.item():.6f}. Hint: {hint}",
        )
    expect(
        got.requires_grad,
        "dpo_loss lost the graph. Hint: compute it with torch operations, no .item() or floats.",
    )
    got_grads = _grad(got, (pc, pr))
    want_grads = _grad(expected, (pc, pr))
    for g, w in zip(got_grads, want_grads):
        expect(
            allclose(g, w, rtol=1e-4, atol=1e-7),
            "dpo_loss has the right value but not the right gradient. "
            "Hint: compute it from the inputs with torch operations only.",
        )
    return want_grads


def _check_weights(dpo_loss, dpo_pair_weights, pc, pr, rc, rr, beta) -> torch.Tensor:
    """Check dpo_loss, then compare dpo_pair_weights with the gradient autograd finds."""
    grad_chosen, grad_rejected = _check_loss(dpo_loss, pc, pr, rc, rr, beta)
    n = pc.numel()
    expected = -grad_chosen * n / beta  # dL/d log pi(chosen_i) = -(beta / N) sigmoid(-m_i)
    expect(
        allclose(grad_rejected * n / beta, expected, atol=1e-6),
        "the course's gradients disagree (not your answer's fault). Hint: tell the course's authors.",
    )
    got = dpo_pair_weights(pc, pr, rc, rr, beta)
    expect(
        _is_tensor(got) and got.shape == pc.shape,
        f"dpo_pair_weights must return one weight per pair, a tensor of shape {tuple(pc.shape)}. "
        "Hint: compute the weights element by element, one per margin.",
    )
    got = got.detach()
    if allclose(got, expected, rtol=1e-4, atol=1e-6):
        return got
    margins = _margins(pc, pr, rc, rr, beta)
    hint = "the weight of a pair is the sigmoid of a function of its margin: see the gradient."
    if allclose(got, _sigmoid(margins), rtol=1e-4, atol=1e-6):
        hint = "the sign is flipped: pairs ranked wrong (margin < 0) must weigh the most, near 1."
    elif allclose(got, beta * expected / n, rtol=1e-4, atol=1e-7) or allclose(
        got, expected / n, rtol=1e-4, atol=1e-7
    ):
        hint = "the weight is the gradient's sigmoid factor alone, without beta / N."
    shown = [round(v, 4) for v in got.tolist()]
    expect(
        False,
        f"dpo_pair_weights is {shown}, expected {[round(v, 4) for v in expected.tolist()]}. "
        f"Hint: {hint}",
    )


def _visible_loss_cases() -> tuple[list, list]:
    """The visible tests: (weights cases, loss-only cases)."""
    pc, pr, rc, rr = visible_logps()
    trained = rc + torch.linspace(-20, 20, 8)  # trained: chosen up by 20 nats on some pairs
    one = torch.tensor([-1.0])
    return [(pc, pr, rc, rr, 0.1), (trained, pr, rc, rr, 0.1)], [
        (torch.tensor([-1e4]), one, one.clone(), one.clone(), 0.1)
    ]


@exercise(3, "dpo_loss", "dpo_pair_weights")
def dpo_loss(dpo_loss, dpo_pair_weights, cases=None, loss_cases=None) -> str:
    """Exercise 3: dpo_loss against preference.dpo_loss and autograd, dpo_pair_weights against
    the gradient.

    `cases` is a list of (policy_chosen, policy_rejected, reference_chosen, reference_rejected,
    beta) on which both are checked, `loss_cases` the same on which dpo_loss alone is; without
    `cases`, the visible tests.
    """
    if cases is not None:
        for case in cases:
            _check_weights(dpo_loss, dpo_pair_weights, *case)
        for case in loss_cases or ():
            _check_loss(dpo_loss, *case)
        return ""
    weight_cases, loss_only = _visible_loss_cases()
    for case in weight_cases:
        _check_weights(dpo_loss, dpo_pair_weights, *case)
    for case in loss_only:
        _check_loss(dpo_loss, *case)
    trained, pr, rc, rr, beta = weight_cases[1]
    weights = dpo_pair_weights(trained, pr, rc, rr, beta)
    margins = _margins(trained, pr, rc, rr, beta)
    lines = [
        f"margin {m:+6.2f} -> weight {w:.3f}" for m, w in zip(margins.tolist(), weights.tolist())
    ]
    start = dpo_loss(rc, rr, rc, rr, beta).item()
    lines.append(f"the loss before training is log 2 = {math.log(2):.4f}: {start:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Exercise 4: dpo_trainer.
# --------------------------------------------------------------------------------------------


def _loss_at_zero_margin(loss_type, beta) -> float:
    """The loss of a pair whose policy is its reference (margin 0)."""
    zero = torch.zeros(1)
    if loss_type == "sigmoid":
        return preference.dpo_loss(zero, zero, zero, zero, beta).item()  # log 2
    return {"hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2}[loss_type]


def _setting_checks(args, beta, loss_type, steps, batch_size, learning_rate) -> tuple:
    """(holds, what is wrong, hint) for each setting of the run."""
    return (
        (
            isclose(args.beta, beta),
            f"its beta is {args.beta:g}, the run's is {beta:g}",
            "the config's beta is DPO's beta (exercise 1).",
        ),
        (
            list(args.loss_type) == [loss_type],
            f"its loss type is {args.loss_type}, the run's is {loss_type!r}",
            "the config names the loss by its type: sigmoid, hinge, ipo, ...",
        ),
        (
            args.max_steps == steps,
            f"it runs max_steps={args.max_steps}, the run has {steps} optimizer steps",
            "max_steps counts optimizer steps (and overrides num_train_epochs).",
        ),
        (
            args.per_device_train_batch_size == batch_size
            and args.gradient_accumulation_steps == 1,
            f"it takes batches of {args.per_device_train_batch_size} and accumulates "
            f"{args.gradient_accumulation_steps}, the run takes {batch_size} pairs per step",
            "the per-device train batch size is the pairs per batch; one batch per step.",
        ),
        (
            isclose(args.learning_rate, learning_rate),
            f"its learning rate is {args.learning_rate:g}, the run's is {learning_rate:g}",
            "TRL's default learning rate is not the run's: set it.",
        ),
        *plain_run_settings(args, "DPO config"),
    )


def _check_settings(trainer, tiny, beta, loss_type, r, steps, batch_size, learning_rate) -> None:
    """Compare the trainer's settings with the description; explain the first mismatch."""
    expect(
        isinstance(trainer, DPOTrainer),
        f"dpo_trainer returned {type(trainer).__name__}, not TRL's DPO trainer. "
        "Hint: return the trainer itself, built from the run's config, the data set and the "
        "LoRA config.",
    )
    expect(
        trainer.state.global_step == 0,
        "the trainer has trained already. Hint: return it before training it: the tests train it.",
    )
    for ok, problem, hint in _setting_checks(
        trainer.args, beta, loss_type, steps, batch_size, learning_rate
    ):
        expect(ok, f"{problem}. Hint: {hint}")
    expect(
        isinstance(trainer.model, PeftModel),
        "the trainer's model has no LoRA adapter. Hint: give the LoraConfig to the trainer "
        "(its peft_config argument); it wraps the model itself.",
    )
    expect(
        trainer.ref_model is None,
        "the trainer keeps a reference model of its own. Hint: with a PEFT adapter the reference "
        "is the same model with the adapter switched off: pass no ref_model.",
    )
    used = trainer.model.peft_config["default"]
    expect(
        (used.r, used.lora_alpha) == (r, 2 * r),
        f"the adapter has r={used.r} and lora_alpha={used.lora_alpha}, the run rank {r} scaled "
        "by 2. Hint: lora_alpha / r is the scale.",
    )
    trainable = trainer.model.get_nb_trainable_parameters()[0]
    expected = memory.lora_trainable_params(tiny, r)
    expect(
        trainable == expected,
        f"the adapter trains {trainable:,} parameters, LoRA of rank {r} on all linear layers "
        f"{expected:,}. Hint: LoraConfig's target_modules decides which layers get an adapter.",
    )


def _build(dpo_trainer, tokenizer, pairs, beta, loss_type, r, steps, batch_size, lr, seed, out):
    """Call the learner's dpo_trainer; turn TRL's refusals into hints."""
    try:
        with quiet():
            return dpo_trainer(
                assets.tiny_llama(tokenizer, seed=seed).eval(),
                tokenizer,
                pairs,
                beta,
                loss_type,
                r,
                steps,
                batch_size,
                lr,
                out,
            )
    except ValueError as error:
        if "bf16" not in str(error):
            raise
        expect(
            False,
            f"TRL's DPO config refused the settings: {error} Hint: the run is in fp32, and "
            "TRL's DPO config turns bf16 on by default: switch it off.",
        )
    except OSError as error:  # TRL looked for the model's files to load a reference copy
        expect(
            False,
            f"TRL's DPO trainer tried to load a reference copy of the model ({error}). Hint: give it "
            "the LoraConfig (peft_config): its reference is then the model with the adapter off.",
        )


def _check_log(trainer, output_dir, beta, loss_type, steps, learning_rate) -> list[dict]:
    """Check what the trained run logged and saved; return its logged steps."""
    expect(
        trainer.state.global_step == steps,
        f"the trainer ran {trainer.state.global_step} optimizer steps, the run has {steps}. "
        "Hint: max_steps.",
    )
    logged = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    expect(
        [entry["step"] for entry in logged] == list(range(1, steps + 1)),
        f"the metrics were logged at steps {[entry['step'] for entry in logged]}, the run logs "
        "every step. Hint: logging_steps.",
    )
    first = logged[0]
    expect(
        abs(first["rewards/margins"]) < 1e-6 and abs(first["rewards/chosen"]) < 1e-6,
        f"at the first step the reward margin is {first['rewards/margins']:.3g}, not 0: the "
        "policy is not its reference. Hint: let TRL switch the fresh adapter off for the "
        "reference (no ref_model).",
    )
    expected = _loss_at_zero_margin(loss_type, beta)
    expect(
        isclose(first["loss"], expected, rel_tol=1e-4),
        f"the first step's loss is {first['loss']:.4f}; {loss_type!r} with beta={beta:g} gives "
        f"{expected:.4f} at a zero margin. Hint: the loss type and beta.",
    )
    expect(
        isclose(first["learning_rate"], learning_rate, rel_tol=1e-6),
        f"the first step ran at a learning rate of {first['learning_rate']:.3g}. Hint: "
        "the learning rate setting, and TRL's default schedule (no warm-up).",
    )
    expect(
        any(abs(entry["rewards/margins"]) > 0 for entry in logged[1:]),
        "the margins stayed 0: the adapter did not train. Hint: the learning rate and the "
        "adapter's settings.",
    )
    saved = sorted(path.name for path in output_dir.glob("checkpoint-*"))
    expect(not saved, f"the run saved {saved}. Hint: this run saves no checkpoint (save_strategy).")
    return logged


def _check_trainer(
    dpo_trainer, tokenizer, scratch, pairs, beta, loss_type, r, steps, batch_size, learning_rate,
    seed=0, run=True,
) -> list[dict] | None:  # fmt: skip
    """Build the trainer with dpo_trainer, check its settings, train it (if run), check its log."""
    output_dir = Path(tempfile.mkdtemp(dir=scratch))
    original = repr(pairs)
    args = (beta, loss_type, r, steps, batch_size, learning_rate)
    trainer = _build(dpo_trainer, tokenizer, pairs, *args, seed, output_dir)
    expect(repr(pairs) == original, "dpo_trainer changed the pairs. Hint: only read them.")
    tiny = {**assets.TINY_LLAMA, "vocab_size": len(tokenizer)}  # tiny_llama's shape
    _check_settings(trainer, tiny, *args)
    if not run:
        return None
    with quiet():
        trainer.train()
    return _check_log(trainer, output_dir, beta, loss_type, steps, learning_rate)


@exercise(4, "dpo_trainer")
def dpo_trainer(dpo_trainer, tokenizer, pairs, cases=None) -> str:
    """Exercise 4: the trainer's settings read from TRL, then its run read from its log.

    `cases` is a list of dicts, each the keyword arguments of one run of the hidden checks (the
    pairs, beta, the loss, r, steps, the batch size and the learning rate by their names in
    dpo_trainer's signature; optionally seed, and run=False to check the settings without
    training); without it, the visible tests on `pairs`.
    """
    with tempfile.TemporaryDirectory(prefix="dpo-exercises-") as scratch:
        if cases is not None:
            for case in cases:
                _check_trainer(dpo_trainer, tokenizer, scratch, **case)
            return ""
        logged = _check_trainer(
            dpo_trainer, tokenizer, scratch, pairs, 0.2, "sigmoid", r=4, steps=2, batch_size=2,
            learning_rate=5e-3,
        )  # fmt: skip
        _check_trainer(
            dpo_trainer, tokenizer, scratch, pairs, 0.5, "hinge", r=2, steps=3, batch_size=1,
            learning_rate=1e-3, run=False,
        )  # fmt: skip
    return "\n".join(
        f"step {entry['step']}: loss {entry['loss']:.4f}, margin {entry['rewards/margins']:+.4f}, "
        f"accuracy {entry['rewards/accuracies']:.0%}"
        for entry in logged
    )
