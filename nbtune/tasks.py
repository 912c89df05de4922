"""The tasks nbtune tunes for, in one table that validation, model loading, peft, the estimator, forms and docs
read. A new task family (image classification, image-to-text) is one entry here, plus the encoder that turns
its rows into model inputs (nbtune/data.py) and, where the loss or metrics differ, a training stage
(nbtune/stages.py); see ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

HELD_OUT_ACCURACY = "held-out accuracy"  # what an eval "accuracy" measures unless a task or stage says more


@dataclass(frozen=True)
class Task:
    """One task: its config name, what it does in the user's words, and how transformers and peft call it."""

    name: str
    description: str
    auto_class: str  # the transformers AutoModel class that loads a model for it
    peft_task_type: str | None  # peft's TaskType value; None: peft adapts the model as it is (vision models)
    metric: str | None = None  # an eval metric beside the loss: "accuracy" (from the logits), "exact-match"
    # (greedy captions) or "judged" (drawn images, by a classifier)
    accuracy_means: str = HELD_OUT_ACCURACY  # what its eval "accuracy" measures, in words
    inputs: str = "text"  # what a row gives the model: "text" (a tokenizer) or "image" (an image processor)
    head: tuple[str, ...] = ()  # a new head's modules, trained whatever the method (peft: `modules_to_save`)
    library: str = "transformers"  # what loads and runs it: transformers, or diffusers (a pipeline folder)
    token_loss: bool = True  # its loss is a token cross-entropy, so exp(loss) is a perplexity
    default_targets: tuple[str, ...] = ()  # the modules peft methods adapt when not chosen (else peft's default)

    @property
    def classifies(self) -> bool:
        """Rows carry a class label and the model a freshly initialised classification head."""
        return self.metric == "accuracy"

    @property
    def captions(self) -> bool:
        """Rows carry an image and its caption; the model writes captions, scored by greedy exact match."""
        return self.inputs == "image" and self.metric == "exact-match"

    @property
    def draws(self) -> bool:
        """The model draws images from prompts (a diffusers pipeline; nbtune/diffusion.py)."""
        return self.library == "diffusers"


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("causal-lm", "generate the target text", "AutoModelForCausalLM", "CAUSAL_LM"),
    Task("seq2seq", "encoder-decoder: generate the target from the input", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    Task("seq-cls", "classify each row", "AutoModelForSequenceClassification", "SEQ_CLS", metric="accuracy"),
    Task("image-cls", "classify each image", "AutoModelForImageClassification", None, metric="accuracy",
         inputs="image", head=("classifier",)),
    Task("image-to-text", "caption each image", "AutoModelForImageTextToText", None, metric="exact-match",
         accuracy_means="held-out exact match of greedy captions", inputs="image"),
    Task("text-to-image", "draw images from a prompt (DreamBooth: a new concept)", "StableDiffusionPipeline", None,
         metric="judged", accuracy_means="held-out concept recognition: the share of images drawn from held-out "
         "prompts that the data's judge (an image classifier) names as the prompt's concept", inputs="image", library="diffusers",
         token_loss=False, default_targets=("to_k", "to_q", "to_v", "to_out.0")),  # diffusers' DreamBooth LoRA
)}
TEXT_TASKS = tuple(name for name, t in TASKS.items() if t.inputs == "text")


def task(name: str) -> Task:
    """The task called `name` (config validation has already refused unknown names)."""
    return TASKS[name]
