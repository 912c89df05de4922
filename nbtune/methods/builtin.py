"""The built-in tuning methods: registry entries, whose hooks live in the modules beside this one.

Learning rates are recommendations for the tiny embedded model; larger models usually want smaller ones.
"""

from __future__ import annotations

from nbtune.methods import adapters, distillation, peft_methods, selective
from nbtune.methods.registry import ALL_TASKS, DRAWING_TASKS, Field, Method, register
from nbtune.tasks import TEXT_TASKS

# virtual tokens join a sequence of token embeddings: peft's prompt methods need a text model's input embeddings
PROMPT_TASKS = TEXT_TASKS
NON_LINEARITIES = ("relu", "gelu", "silu", "tanh")


def _lora_fields(r: int = 16) -> tuple[Field, ...]:
    return (
        Field("r", "int", r, "Rank of the update matrices.", low=1, high=1024),
        Field("alpha", "float", 2 * r, "Scaling numerator: the update is multiplied by alpha / r.", low=0),
        Field("dropout", "float", 0.05, "Dropout on the LoRA input.", low=0, high=0.9),
        Field("target_modules", "str-list", None,
              "Module names to adapt (empty: peft's default for the architecture).", optional=True),
        Field("use_dora", "bool", False, "DoRA: also learn a magnitude vector per output (Liu et al. 2024)."),
        Field("use_rslora", "bool", False, "rsLoRA: scale by alpha / sqrt(r) instead of alpha / r."),
    )


register(Method(
    name="full",
    title="Full fine-tuning",
    family="full",
    description="Update every weight of the model.",
    paper="Howard & Ruder 2018, Universal Language Model Fine-tuning (arXiv:1801.06146)",
    fields=(),
    apply=selective.apply_full,
    learning_rate=1e-4,
    tasks=(*ALL_TASKS, *DRAWING_TASKS),  # text-to-image: the whole UNet
    is_peft=False,
))

register(Method(
    name="freeze",
    title="Layer freezing",
    family="selective",
    description="Train only the top transformer layers (or all but the bottom ones) plus the head.",
    paper="Howard & Ruder 2018, Universal Language Model Fine-tuning (arXiv:1801.06146)",
    fields=(
        Field("mode", "choice", "top-only", "top-only: train only the top N layers; "
              "bottom-frozen: freeze the embeddings and the bottom N layers, train the rest.",
              choices=("top-only", "bottom-frozen")),
        Field("layers", "int", 1, "N: how many layers (of each stack, for encoder-decoder models).", low=0),
        Field("train_head", "bool", True, "Also train the output head and the final norm."),
    ),
    apply=selective.apply_freeze,
    learning_rate=3e-4,
    is_peft=False,
))

register(Method(
    name="bitfit",
    title="BitFit",
    family="selective",
    description="Train only the bias terms (and a classification head); every weight matrix stays frozen.",
    paper="Ben Zaken et al. 2021, BitFit: Simple Parameter-efficient Fine-tuning (arXiv:2106.10199)",
    fields=(),
    apply=selective.apply_bitfit,
    learning_rate=1e-3,
    is_peft=False,
    trains_only_biases=True,
))

register(Method(
    name="lora",
    title="LoRA",
    family="reparametrization",
    description="Train low-rank updates B·A added to chosen weight matrices; the base stays frozen.",
    paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)",
    fields=_lora_fields(),
    apply=peft_methods.apply_lora,
    learning_rate=3e-3,
    lighter_methods=("qlora",),
    tasks=(*ALL_TASKS, *DRAWING_TASKS),  # text-to-image: the UNet's attention (tasks.py default_targets)
))

register(Method(
    name="qlora",
    title="QLoRA",
    family="reparametrization",
    description="LoRA on a base model quantized to 4 bits with bitsandbytes.",
    paper="Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (arXiv:2305.14314)",
    fields=(
        *_lora_fields(),
        Field("quant_type", "choice", "nf4", "4-bit data type: nf4 (normal float) or fp4.", choices=("nf4", "fp4")),
        Field("double_quant", "bool", True, "Also quantize the quantization constants (saves ~0.4 bit/weight)."),
        Field("compute_dtype", "choice", "auto", "Dtype of the matmuls on dequantized weights "
              "(auto: the model dtype).", choices=("auto", "fp32", "fp16", "bf16")),
    ),
    apply=peft_methods.apply_qlora,
    load_kwargs=peft_methods.qlora_load_kwargs,
    learning_rate=3e-3,
    lighter_methods=(),  # nothing lighter: LoRA on a 4-bit base
))

register(Method(
    name="adapter",
    title="Bottleneck adapters",
    family="adapter",
    description="Insert small down-project / non-linearity / up-project blocks with a residual in every layer.",
    paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (arXiv:1902.00751)",
    fields=(
        Field("bottleneck", "int", 16, "Width of the adapter's hidden layer.", low=1, high=4096),
        Field("non_linearity", "choice", "relu", "Activation between the projections.", choices=NON_LINEARITIES),
        Field("placement", "choice", "both", "Where adapters go: after the attention output, after the "
              "feed-forward output, or both.", choices=("both", "attention", "ffn")),
        Field("init_scale", "float", 1e-3, "Std of the down-projection init (the up-projection starts at zero).",
              low=0, high=1),
    ),
    apply=adapters.apply_adapters,
    save=adapters.save_adapters,
    load_trained=adapters.load_adapters,
    learning_rate=3e-3,
    is_peft=False,
))

register(Method(
    name="prompt-tuning",
    title="Prompt tuning",
    family="prompt",
    description="Learn a few soft-prompt embeddings prepended to every input; the model stays frozen.",
    paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning (arXiv:2104.08691)",
    fields=(
        Field("num_virtual_tokens", "int", 16, "Soft-prompt length (tokens added to each sequence).", low=1, high=512),
        Field("init", "choice", "random", "Start from random embeddings or from the embeddings of init_text.",
              choices=("random", "text")),
        Field("init_text", "str", "", "Text whose token embeddings initialise the prompt (init = text)."),
    ),
    apply=peft_methods.apply_prompt_tuning,
    learning_rate=3e-2,
    tasks=PROMPT_TASKS,
    virtual_tokens="num_virtual_tokens",
))

# peft 0.21 hands the prefix to the layers as a KV cache that each forward appends to; gradient checkpointing's
# recomputation appends it again, and the attention fails on the doubled length (transformers 5.24).
PREFIX_RECOMPUTED = ("its prefix is a KV cache that gradient checkpointing's recomputation extends a second time "
                     "(peft 0.21, transformers 5.24): the step fails on a length mismatch")

register(Method(
    name="prefix-tuning",
    title="Prefix tuning",
    family="prompt",
    description="Learn key/value prefixes for every attention layer, produced by a small MLP.",
    paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation (arXiv:2101.00190)",
    fields=(
        Field("num_virtual_tokens", "int", 16, "Prefix length (tokens added to each sequence).", low=1, high=512),
        Field("encoder_hidden_size", "int", 64, "Hidden width of the reparametrisation MLP.", low=1, high=8192),
    ),
    apply=peft_methods.apply_prefix_tuning,
    learning_rate=1e-2,
    tasks=PROMPT_TASKS,
    virtual_tokens="num_virtual_tokens",
    no_gradient_checkpointing=PREFIX_RECOMPUTED,
))

register(Method(
    name="p-tuning",
    title="P-tuning",
    family="prompt",
    description="Learn virtual-token embeddings produced by a small prompt encoder (MLP or LSTM).",
    paper="Liu et al. 2021, GPT Understands, Too (arXiv:2103.10385)",
    fields=(
        Field("num_virtual_tokens", "int", 16, "Virtual tokens added to each sequence.", low=1, high=512),
        Field("encoder", "choice", "mlp", "Prompt encoder architecture.", choices=("mlp", "lstm")),
        Field("encoder_hidden_size", "int", 64, "Hidden width of the prompt encoder.", low=1, high=8192),
    ),
    apply=peft_methods.apply_p_tuning,
    learning_rate=2e-2,
    tasks=PROMPT_TASKS,
    virtual_tokens="num_virtual_tokens",
))

register(Method(
    name="p-tuning-v2",
    title="P-tuning v2",
    family="prompt",
    description="Deep prompts: learned key/value prefixes at every layer, without reparametrisation.",
    paper="Liu et al. 2022, P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning (arXiv:2110.07602)",
    fields=(
        Field("num_virtual_tokens", "int", 16, "Prefix length (tokens added to each sequence).", low=1, high=512),
    ),
    apply=peft_methods.apply_p_tuning_v2,
    learning_rate=1e-2,
    tasks=PROMPT_TASKS,
    virtual_tokens="num_virtual_tokens",
    no_gradient_checkpointing=PREFIX_RECOMPUTED,
))

register(Method(
    name="ia3",
    title="IA³",
    family="rescaling",
    description="Learn vectors that rescale keys, values and feed-forward activations.",
    paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than "
          "In-Context Learning (arXiv:2205.05638)",
    fields=(
        Field("target_modules", "str-list", None,
              "Modules whose activations are rescaled (empty: peft's default for the architecture).", optional=True),
        Field("feedforward_modules", "str-list", None,
              "Which target modules are feed-forward (rescaled on the input side; empty: peft's default).",
              optional=True),
    ),
    apply=peft_methods.apply_ia3,
    learning_rate=1e-2,
))

register(Method(
    name="adalora",
    title="AdaLoRA",
    family="reparametrization",
    description="LoRA in SVD form whose rank budget is reallocated during training to the most important weights.",
    paper="Zhang et al. 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (arXiv:2303.10512)",
    fields=(
        Field("init_r", "int", 12, "Initial rank of every adapted matrix.", low=1, high=1024),
        Field("target_r", "int", 8, "Average rank kept after pruning.", low=1, high=1024),
        Field("alpha", "float", 32, "Scaling numerator of the update.", low=0),
        Field("dropout", "float", 0.05, "Dropout on the adapter input.", low=0, high=0.9),
        Field("tinit", "int", 10, "Warm-up steps before ranks are pruned.", low=0),
        Field("tfinal", "int", 20, "Final steps with the ranks fixed.", low=0),
        Field("deltaT", "int", 5, "Steps between two budget reallocations.", low=1),
        Field("target_modules", "str-list", None,
              "Module names to adapt (empty: peft's default for the architecture).", optional=True),
    ),
    apply=peft_methods.apply_adalora,
    callbacks=peft_methods.adalora_callbacks,
    no_sharding=("its rank allocator reads every adapted layer's whole singular values and their gradients at "
                 "each budget step, and a sharded strategy leaves each process only a shard of them"),
    learning_rate=3e-3,
))

register(Method(
    name="distillation",
    title="Knowledge distillation",
    family="distillation",
    description="Train a shallower student, started from every other teacher layer, to match the teacher.",
    paper="Sanh et al. 2019, DistilBERT, a distilled version of BERT (arXiv:1910.01108); "
          "Hinton et al. 2015, Distilling the Knowledge in a Neural Network (arXiv:1503.02531)",
    fields=(
        Field("temperature", "float", 2.0, "Softens both distributions before comparing them.", low=0.1, high=100),
        Field("alpha", "float", 0.5, "Weight of the distillation term; 1 - alpha weighs the hard-label loss.",
              low=0, high=1),
        Field("student_layers", "int", None, "Layers of the student (empty: half the teacher's).",
              low=1, optional=True),
    ),
    apply=distillation.apply_distillation,
    compute_loss=distillation.distillation_loss,
    learning_rate=1e-3,
    tasks=("causal-lm", "seq-cls", "image-cls"),
    is_peft=False,
))
