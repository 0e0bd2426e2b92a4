"""A verifier fine-tuned from a language model's own weights on Monte Carlo step labels:
a process reward model (the Math-Shepherd recipe) trained here, on a CPU or a GPU.

`testtime.learned` reads a frozen model's hidden states and fits a linear model to
them; here the model itself learns. Its transformer body (loaded with transformers
from the same GGUF file the engine runs, dequantised to float32) gets a linear value
head on the last token of every step, and body and head are trained together with
the cross-entropy against each step's soft label (the fraction of its rollouts that
were verified), plus the last step of every graded sample without step labels,
labelled by its verdict. Solutions are rendered and split into steps exactly as the
frozen-feature verifier does (`learned.step_layout`, the engine's own chat format), so
one pass scores every step of a solution.

Nothing is chosen on evaluation problems: a fraction of the *training* problems
(`dev`) is kept out of the gradient, and after every epoch the model's ranking of
those problems' solutions (within-problem AUC of the last step's score against the
label, as best-of-N uses it) decides which epoch's weights are kept; the decision
threshold comes from the same predictions.

The file is a safetensors file (no pickle, so loading it runs no code): the head, and
for every trained tensor of the body its difference from the base model's weights in
bfloat16 (differences are small, so bfloat16's 8-bit mantissa keeps them to 0.4%;
the base weights come from the GGUF file, checked by fingerprint on load), and a JSON
header like the `.npz` verifier's: the problems it saw, the labels, the figures.
With `lora=r` (`FinetuneConfig.lora`) only LoRA adapters of rank r on the body's
linear layers learn (peft), and the file holds them (in float32) instead of the
differences: for the embedded model about 20 MB at rank 16 instead of about 200.
It is used the same way: `--prm trained --prm-arg path=FILE`.

Needs torch and transformers (`pip install 'testtime[finetune]'`); on a CPU, install
torch's CPU build first (the default wheel on Linux carries CUDA).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .engines.base import Request
from .errors import InputError
from .files import atomic_path
from .flops import Usage
from .learned import Labelled, _auc, _log_loss, best_threshold, macro_f1, problem_key, step_layout, within_auc
from .spec import SamplingParams

FORMAT = "testtime-finetuned-verifier/1"
_BASES: dict[str, Any] = {}
"""Base models loaded in this process, by file and fingerprint (each value model copies one)."""


def _torch():
    import importlib.util

    try:
        import torch

        if importlib.util.find_spec("transformers") is None:
            raise ImportError("transformers")
    except ImportError:
        raise InputError("a fine-tuned verifier needs torch and transformers: pip install 'testtime[finetune]' "
                         "(on a CPU, install torch's CPU build first)") from None
    return torch


def is_finetuned(path: str | Path) -> bool:
    """Whether a file is a safetensors file (a fine-tuned verifier) rather than an `.npz` one."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 << 20


def read_header(path: str | Path) -> tuple[dict[str, Any], float]:
    """(meta, threshold) of a fine-tuned verifier file, from its header alone: no
    tensor is read and no model is loaded."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no trained verifier at {path} (make one with testtime train-verifier)")
    try:
        with safe_open(str(path), "np") as f:
            header = json.loads((f.metadata() or {}).get("testtime", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path} is not a fine-tuned verifier file ({type(e).__name__}: {e})") from None
    if header.get("format") != FORMAT:
        raise InputError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    threshold = float(header.pop("threshold"))
    header.pop("format")
    return header, threshold


@dataclass
class FinetuneConfig:
    epochs: int = 3
    lr: float = 2e-5
    """Learning rate of the transformer body (AdamW)."""
    head_lr: float = 1e-3
    batch: int = 8
    """Solutions per optimiser step."""
    dev: float = 0.2
    """Fraction of the training problems kept out of the gradient to choose the epoch and threshold."""
    weight_decay: float = 0.01
    max_tokens: int = 1024
    """Longest solution (with its question) to train on or score."""
    seed: int = 0
    lora: int = 0
    """Rank of LoRA adapters (peft) on every linear layer of the body, which alone learn
    (scaled by alpha = 2 x rank); 0: every tensor but the embeddings learns. The file
    then holds the adapters: about 20 MB at rank 16 instead of about 200."""

    def check(self) -> None:
        if self.epochs < 1:
            raise InputError(f"epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and self.head_lr > 0):
            raise InputError(f"learning rates must be positive, got lr={self.lr}, head_lr={self.head_lr}")
        if self.batch < 1:
            raise InputError(f"batch must be >= 1, got {self.batch}")
        if not 0 <= self.dev < 1:
            raise InputError(f"dev must be in [0, 1), got {self.dev}")
        if self.max_tokens < 8:
            raise InputError(f"max_tokens must be >= 8, got {self.max_tokens}")
        if self.lora < 0:
            raise InputError(f"lora is a rank (0: no adapters), got {self.lora}")


@dataclass
class Encoded:
    """A solution as the value model sees it: its tokens, where its labelled steps end, their labels."""

    tokens: list[int]
    positions: list[int]
    targets: list[float]
    key: str


class ValueModel:
    """The base model's transformer body with a linear value head, and the engine that renders
    and tokenises solutions in the model's chat format."""

    def __init__(self, model: str | Path | None = None, n_threads: int | None = None, device: str | None = None,
                 chat_template: str | None = None, fingerprint: str | None = None, source: str = ""):
        """fingerprint: the model file's that a saved verifier was trained from; another file
        is refused (`source` names the verifier) before anything heavy is loaded."""
        torch = _torch()
        from transformers import AutoModel

        from .engines._llama import check_gguf, resolve_model
        from .engines.llamacpp import LlamaCppEngine

        path = check_gguf(resolve_model(model))
        self.model_arg = None if model is None else str(model)
        self.engine = LlamaCppEngine(path, slots=1, max_prefixes=1, seq_ctx=64, n_threads=1,
                                     chat_template=chat_template, token_stats=False)
        got = self.engine.identity().get("fingerprint")
        if fingerprint is not None and got != fingerprint:
            self.engine.close()
            raise InputError(f"{source} was fine-tuned from a model with fingerprint {fingerprint}; {path.name} "
                             f"(fingerprint {got}) is another model: give the same file (model=...)")
        if n_threads:
            torch.set_num_threads(n_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        key = f"{path.resolve()}|{got}"
        if key not in _BASES:
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.set_verbosity_error()
                with contextlib.redirect_stderr(io.StringIO()):  # its GGUF reader draws a progress bar
                    _BASES[key] = AutoModel.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
            except (ValueError, KeyError, NotImplementedError, OSError) as e:
                self.engine.close()
                raise InputError(f"transformers cannot load {path} as a model to fine-tune "
                                 f"({type(e).__name__}: {e})") from None
        body = copy.deepcopy(_BASES[key])  # dequantising the GGUF takes seconds: once per process
        self.body = body.to(self.device)
        self.head = torch.nn.Linear(body.config.hidden_size, 1).to(self.device)
        pad = getattr(body.config, "pad_token_id", None)
        self.pad = int(pad) if isinstance(pad, int) else 0
        self.lora = 0
        self.usage = Usage()
        """Every token the value model computed."""
        self.last_usage = Usage()

    def add_lora(self, rank: int) -> None:
        """LoRA adapters of this rank on every linear layer of the body (peft); from now on
        only they learn. Their B matrices start at zero, so the body is unchanged until trained."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise InputError("a LoRA verifier needs peft: pip install 'testtime[finetune]'") from None
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
        self.body = get_peft_model(self.body, config)
        self.lora = rank

    def identity(self) -> dict[str, Any]:
        return {"features": "finetuned_value_head", "model": self.engine.identity()}

    def shape(self) -> Any:
        return self.engine.shape()

    def trainable(self) -> dict[str, Any]:
        """The body's tensors that learn: the LoRA adapters if it has them, else all but the
        token embeddings (a step's value is read from the last hidden state, so the
        embedding matrix, which is also the LM head in tied models, gains little and
        costs the most)."""
        if self.lora:
            return {n: p for n, p in self.body.named_parameters() if ".lora_" in n}
        return {n: p for n, p in self.body.named_parameters() if "embed_tokens" not in n}

    def _tokens(self, question: str, text: str) -> list[int]:
        req = Request(key=0, seeds=(0,), params=SamplingParams(max_tokens=1),
                      messages=({"role": "user", "content": question},), continuation=text)
        return self.engine.prefix_tokens(req)

    def encode(self, question: str, steps: Sequence[str], delimiter: str, max_tokens: int,
               where: str = "") -> tuple[list[int], list[int]]:
        """(tokens, the index of each step's last token)."""
        _, full, ends = step_layout(self._tokens, question, steps, delimiter)
        if len(full) > max_tokens:
            raise InputError(f"{where or 'a solution'}: {len(full)} tokens with its question, more than the "
                             f"value model's limit of {max_tokens} (max_tokens)")
        return full, ends

    def logits(self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]) -> Any:
        """The value head's logits at the given positions of each sequence, concatenated
        (right-padded in one batch; a causal model's states do not see the padding)."""
        torch = _torch()
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        rows, cols = [], []
        for i, (s, pos) in enumerate(zip(seqs, positions)):
            ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[i, :len(s)] = 1
            rows.extend([i] * len(pos))
            cols.extend(pos)
        h = self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return self.head(h[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]).squeeze(-1)

    def predict(self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], batch: int = 16) -> list[np.ndarray]:
        """P(verified) at the positions of each sequence, in batches of similar length."""
        torch = _torch()
        out: list[np.ndarray] = [np.zeros(0)] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        self.body.eval()
        with torch.no_grad():
            for k in range(0, len(order), batch):
                part = [i for i in order[k:k + batch] if positions[i]]
                if not part:
                    continue
                p = torch.sigmoid(self.logits([seqs[i] for i in part], [positions[i] for i in part])).cpu().numpy()
                at = 0
                for i in part:
                    out[i] = p[at:at + len(positions[i])].astype(float)
                    at += len(positions[i])
        return out

    def close(self) -> None:
        self.engine.close()


class FineTuned:
    """A fine-tuned verifier: the value model with its trained weights, its threshold and
    its record. It offers what a frozen-feature verifier's pair (`learned.HiddenStates`,
    `learned.Verifier`) does: `features` gives a step's probability as its one column
    and `predict` reads it back, so evaluation and the reward model treat both alike."""

    def __init__(self, value: ValueModel, threshold: float, meta: dict[str, Any], base: dict[str, Any] | None = None):
        self.value = value
        self.threshold = threshold
        self.meta = meta
        self._base = base
        """The base model's weights of the trained tensors, kept while training (to save differences)."""
        self.max_tokens = int(meta.get("config", {}).get("max_tokens", FinetuneConfig.max_tokens))

    @property
    def problems(self) -> set[str]:
        return set(self.meta["train_problems"])

    @property
    def usage(self) -> Usage:
        return self.value.usage

    @property
    def last_usage(self) -> Usage:
        return self.value.last_usage

    def identity(self) -> dict[str, Any]:
        return self.value.identity()

    def shape(self) -> Any:
        return self.value.shape()

    def scores(self, items: Sequence[tuple[str, Sequence[str]]], delimiter: str) -> list[np.ndarray]:
        """P(the step leads to a verified answer) for every step of each (question, steps),
        batched; what it computed is added to `usage` and kept as `last_usage`."""
        seqs, ends = [], []
        for q, steps in items:
            toks, e = self.value.encode(q, steps, delimiter, self.max_tokens) if steps else ([], [])
            seqs.append(toks)
            ends.append(e)
        out = self.value.predict(seqs, ends) if any(ends) else [np.zeros(0)] * len(items)
        self.value.last_usage = Usage.of(sum(len(s) for s in seqs), 0, 0)
        self.value.usage += self.value.last_usage
        return out

    def features(self, question: str, steps: Sequence[str], delimiter: str) -> np.ndarray:
        return self.scores([(question, steps)], delimiter)[0][:, None]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X)[:, 0]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        torch = _torch()
        base = self._base
        if base is None:
            raise InputError("only a verifier fine-tuned in this process can be saved")
        tensors = {"head.weight": self.value.head.weight.detach().cpu().contiguous(),
                   "head.bias": self.value.head.bias.detach().cpu().contiguous()}
        for name, p in self.value.trainable().items():
            if self.value.lora:  # the adapters themselves, small enough to keep in full precision
                tensors["lora." + name] = p.detach().cpu().contiguous()
            else:
                tensors["delta." + name] = (p.detach().cpu() - base[name]).to(torch.bfloat16).contiguous()
        header = json.dumps({"format": FORMAT, **self.meta, "threshold": self.threshold})
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"testtime": header})
        return path

    @classmethod
    def load(cls, path: str | Path, model: str | Path | None = None, n_threads: int | None = None,
             device: str | None = None) -> "FineTuned":
        """The verifier in `path`, its base model found as named at training time or as
        `model` (another copy of the same file: checked by fingerprint)."""
        torch = _torch()
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        header, threshold = read_header(path)
        try:
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path} is not a fine-tuned verifier file ({type(e).__name__}: {e})") from None
        trained = header["features"]["model"]
        value = ValueModel(model if model is not None else header.get("feature_model"), n_threads, device,
                           fingerprint=trained.get("fingerprint"), source=f"{path} ({trained.get('model')})")
        rank = int(header.get("config", {}).get("lora", 0))
        if rank:
            try:
                value.add_lora(rank)
            except BaseException:
                value.close()
                raise
        prefix = "lora." if rank else "delta."
        params = value.trainable()
        missing = [n for n in params if prefix + n not in tensors]
        if missing or "head.weight" not in tensors:
            value.close()
            raise InputError(f"{path}: tensors missing ({', '.join(missing[:3]) or 'head.weight'}); the file is damaged")
        with torch.no_grad():
            for n, p in params.items():
                d = tensors[prefix + n]
                if d.shape != p.shape:
                    value.close()
                    raise InputError(f"{path}: tensor {n} has shape {tuple(d.shape)}, the model's is {tuple(p.shape)}")
                if rank:
                    p.copy_(d.to(p.dtype).to(p.device))
                else:
                    p += d.to(p.dtype).to(p.device)
            value.head.weight.copy_(tensors["head.weight"])
            value.head.bias.copy_(tensors["head.bias"])
        value.body.eval()
        return cls(value, threshold, header)

    def close(self) -> None:
        self.value.close()


def _rank_figures(p: np.ndarray, soft: np.ndarray, last: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(within-problem AUC over last steps, -log loss): the criterion epochs compete on."""
    return within_auc(p, soft > 0, groups, last) or 0.5, -_log_loss(p, soft)


def finetune(solutions: Sequence[Labelled], delimiter: str, cfg: FinetuneConfig = FinetuneConfig(),
             meta: dict[str, Any] | None = None, model: str | Path | None = None, n_threads: int | None = None,
             device: str | None = None, log: Callable[[str], None] | None = None) -> FineTuned:
    """Fine-tune the value model on labelled solutions (`learned.labelled_solutions`); see
    the module's docstring. `log` receives a line per epoch."""
    torch = _torch()
    cfg.check()
    if not solutions:
        raise InputError("no labelled samples to learn from (label a run first: testtime label RUN)")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"finetune/{cfg.seed}")
    value = ValueModel(model, n_threads, device)
    try:
        if cfg.lora:
            value.add_lora(cfg.lora)
        data = []
        for s in solutions:
            toks, ends = value.encode(s.question, s.steps, delimiter, cfg.max_tokens,
                                      where=f"run {s.run_id} sample {s.problem_id}/{s.sample_index}")
            data.append(Encoded(toks, ends[-1:] if s.only_last else ends, list(s.soft), s.key))
        keys = sorted({e.key for e in data})
        n_dev = int(round(cfg.dev * len(keys)))
        if cfg.dev > 0 and len(keys) >= 2:
            n_dev = min(max(n_dev, 1), len(keys) - 1)
        dev_keys = set(rng.sample(keys, n_dev)) if n_dev else set()
        train_rows = [e for e in data if e.key not in dev_keys]
        dev_rows = [e for e in data if e.key in dev_keys]
        targets = np.concatenate([e.targets for e in train_rows])
        mean = float(np.clip(targets.mean(), 0.02, 0.98))
        pos_weight = torch.tensor((1 - mean) / mean, device=value.device)  # good and bad steps weigh alike

        params = value.trainable()
        for n, p in value.body.named_parameters():
            p.requires_grad_(n in params)
        base = {n: p.detach().cpu().clone() for n, p in params.items()}
        opt = torch.optim.AdamW([{"params": list(params.values()), "lr": cfg.lr},
                                 {"params": list(value.head.parameters()), "lr": cfg.head_lr}],
                                weight_decay=cfg.weight_decay)
        dev_soft = np.concatenate([e.targets for e in dev_rows]) if dev_rows else np.zeros(0)
        dev_groups = np.concatenate([[keys.index(e.key)] * len(e.targets) for e in dev_rows]) if dev_rows else np.zeros(0)
        dev_last = np.zeros(len(dev_soft), bool)
        at = 0
        for e in dev_rows:
            at += len(e.targets)
            dev_last[at - 1] = True

        def dev_predictions() -> np.ndarray:
            preds = value.predict([e.tokens for e in dev_rows], [e.positions for e in dev_rows])
            return np.concatenate(preds) if preds else np.zeros(0)

        history, best, best_state, best_pred, chosen = [], None, None, None, cfg.epochs
        for epoch in range(cfg.epochs):
            order = list(range(len(train_rows)))
            rng.shuffle(order)
            # batches of similar length waste less on padding; their order stays random
            chunks = [sorted(order[i:i + 8 * cfg.batch], key=lambda j: len(train_rows[j].tokens))
                      for i in range(0, len(order), 8 * cfg.batch)]
            batches = [c[i:i + cfg.batch] for c in chunks for i in range(0, len(c), cfg.batch)]
            rng.shuffle(batches)
            value.body.train()
            total, count = 0.0, 0
            for b in batches:
                rows = [train_rows[j] for j in b]
                y = torch.tensor([t for e in rows for t in e.targets], dtype=torch.float32, device=value.device)
                z = value.logits([e.tokens for e in rows], [e.positions for e in rows])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y, pos_weight=pos_weight)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()) + list(value.head.parameters()), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                total += float(loss.detach()) * len(y)
                count += len(y)
            figs: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(count, 1),
                                    "seconds": round(time.perf_counter() - t0, 1)}
            if dev_rows:
                pred = dev_predictions()
                auc, neg_loss = _rank_figures(pred, dev_soft, dev_last, dev_groups)
                figs.update(dev_within_auc=auc, dev_log_loss=-neg_loss, dev_auc=_auc(pred, dev_soft > 0))
                if best is None or (auc, neg_loss) > best:
                    best, best_pred, chosen = (auc, neg_loss), pred, epoch + 1
                    best_state = {n: p.detach().cpu().clone() for n, p in params.items()}
                    best_state["head"] = {k: v.detach().cpu().clone() for k, v in value.head.state_dict().items()}
            history.append(figs)
            if log:
                log("epoch {epoch}: train loss {train_loss:.4f}".format(**figs)
                    + (", dev within-problem AUC {dev_within_auc:.3f}, log loss {dev_log_loss:.4f}".format(**figs)
                       if dev_rows else "") + f" ({figs['seconds']:.0f} s)")
        threshold = 0.5
        if best_state is not None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(best_state[n].to(p.device))
                value.head.load_state_dict(best_state["head"])
            threshold = best_threshold(best_pred, dev_soft > 0)
        value.body.eval()
        info = {
            "kind": "finetune",
            "features": value.identity(),
            "train_problems": sorted({problem_key(s.question) for s in solutions}),
            "dev_problems": sorted(dev_keys),
            "train_solutions": len(train_rows),
            "dev_solutions": len(dev_rows),
            "train_steps": int(sum(len(e.targets) for e in data)),
            "good_steps": int(sum(t > 0 for e in data for t in e.targets)),
            "config": asdict(cfg),
            "epochs": history,
            "chosen_epoch": chosen,
            "pos_weight": float(pos_weight),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if dev_rows:
            info.update(dev_within_auc=best[0], dev_step_accuracy=float(np.mean((best_pred >= threshold) == (dev_soft > 0))),
                        dev_step_f1=macro_f1(dev_soft > 0, best_pred >= threshold))
        return FineTuned(value, float(threshold), {**(meta or {}), **info}, base)
    except BaseException:
        value.close()
        raise
