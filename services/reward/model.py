"""A reward model from a local Hugging Face directory (loaded with services/common/models.py).

    functions:
      - {kind: reward_model, options: {path: /models/rm, mode: classifier}}
      - {kind: reward_model, options: {path: /models/judge, mode: judge, yes: " yes", no: " no"}}

Two modes; `text` is `template.format(prompt=..., response=..., target=...)`:

    classifier  AutoModelForSequenceClassification, logits z of shape (1, num_labels):
                  score = sigmoid(z[0, 0])              if num_labels == 1
                  score = softmax(z[0])[positive_label]  otherwise (default: the last label)
    judge       a causal LM asked a yes/no question; z = next-token logits, shape (vocab,):
                  score = exp(z[yes]) / (exp(z[yes]) + exp(z[no]))
                where yes/no are the first token ids of the `yes` / `no` strings.

Texts longer than `max_tokens` keep their last `max_tokens` tokens (the answer is at the end).
Forward passes are serialized by a lock: on a CPU host concurrent ones only contend.
"""

from __future__ import annotations

import threading

from forgerpc.services.reward.functions import Score

CLASSIFIER_TEMPLATE = "{prompt}\n{response}"
JUDGE_TEMPLATE = ("Question: {prompt}\nReference answer: {target}\nResponse: {response}\n"
                  "Is the response correct? Answer:")


class RewardModel:
    """Reward function object: `RewardModel(path, ...)(item) -> (score in [0, 1], reason)`."""

    def __init__(self, path: str, mode: str = "classifier", template: str = "", yes: str = " yes",
                 no: str = " no", positive_label: int = -1, max_tokens: int = 1024):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from forgerpc.services.common.models import ModelNotFoundError, check_model_dir, load_model

        if mode not in ("classifier", "judge"):
            raise ValueError(f"mode must be 'classifier' or 'judge', got {mode!r}")
        try:
            directory = check_model_dir(path)
        except ModelNotFoundError as e:
            raise ValueError(str(e)) from None
        self.torch = torch
        self.mode = mode
        self.template = template or (CLASSIFIER_TEMPLATE if mode == "classifier" else JUDGE_TEMPLATE)
        self.max_tokens = max_tokens
        self.positive_label = positive_label
        self.lock = threading.Lock()
        if mode == "classifier":
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(directory), dtype=torch.float32, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        else:
            self.model, self.tokenizer = load_model(directory, dtype=torch.float32)
            ids = [self.tokenizer(s, add_special_tokens=False)["input_ids"] for s in (yes, no)]
            if not ids[0] or not ids[1] or ids[0][0] == ids[1][0]:
                raise ValueError(f"yes={yes!r} and no={no!r} must start with different tokens")
            self.yes_id, self.no_id = ids[0][0], ids[1][0]

    def text(self, item) -> str:
        return self.template.format(prompt=item.prompt, response=item.response, target=item.target)

    def _input_ids(self, item):
        ids = self.tokenizer(self.text(item), return_tensors="pt")["input_ids"][:, -self.max_tokens:]
        return ids  # (1, seq_len)

    def __call__(self, item) -> Score:
        torch = self.torch
        ids = self._input_ids(item)
        with self.lock, torch.no_grad():
            logits = self.model(input_ids=ids).logits.float()
        if self.mode == "classifier":
            z = logits[0]  # (num_labels,)
            if z.numel() == 1:
                value = torch.sigmoid(z[0]).item()
            else:
                value = torch.softmax(z, dim=-1)[self.positive_label].item()
            return value, f"reward_model: {value:.3f}"
        z = logits[0, -1]  # (vocab,): next-token logits after the question
        pair = torch.stack([z[self.yes_id], z[self.no_id]])
        value = torch.softmax(pair, dim=-1)[0].item()
        return value, f"reward_model: P(yes)={value:.3f}"
