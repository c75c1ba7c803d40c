"""Export a checkpoint to the format an engine runs: a Hugging Face directory (transformers, vLLM) or one GGUF file
(llama.cpp). Dense, one-shot or AST 2:4 (the zeros are kept: no engine gains speed from them)
and PAT-merged models all export; a SLoRB model does not (no engine has SLoRB). docs/engines.md says which engine
runs which output and what it gains.

    python export.py --ckpt out/pat/final --to gguf --out pat.gguf --gguf-type q8_0
    python export.py --ckpt out/train_ast/final --to hf --out ast-hf --dtype bfloat16
    llama-cli -m pat.gguf -p "Hello"          # or: AutoModelForCausalLM.from_pretrained("ast-hf")
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import checkpoint
from cli import DTYPES, DType, UserError, check_output_dir, check_output_file, cli_main, parse_config
from gguf_file import write_gguf
from tokenizer import vocab_of


@dataclass
class ExportArgs:
    """Export a checkpoint as a Hugging Face directory or a GGUF file."""
    ckpt: str = "smollm2-135m"  # model name or checkpoint path (checkpoint.load)
    to: Literal["hf", "gguf"] = "gguf"  # hf: a transformers / vLLM directory; gguf: one llama.cpp file
    out: str = ""  # (required) the directory (--to hf) or .gguf file (--to gguf) to write
    dtype: DType = "float32"  # weight dtype (--to hf writes it; --to gguf reads in it, then stores --gguf-type)
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = "f16"  # GGUF tensor type (q8_0: rows not 32-wide stay f16)
    overwrite: bool = False  # replace what is at --out


def check_out(args: ExportArgs) -> Path:
    """--out is given and holds nothing we would overwrite, unless --overwrite: checked before the model loads."""
    if not args.out:
        raise UserError("--out is required: the directory (--to hf) or .gguf file (--to gguf) to write")
    out = Path(args.out)
    if args.to == "hf":
        return check_output_dir(out, args.overwrite)
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF file's name ends in .gguf")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} already exists: choose another --out, or pass --overwrite to replace it")
    return check_output_file(out)


def check_hf_width(model_args) -> None:
    """transformers' LlamaConfig refuses a hidden size that is not a multiple of the head count, head_dim or not."""
    if model_args.dim % model_args.n_heads:
        raise UserError(f"width {model_args.dim} is not a multiple of the {model_args.n_heads} heads, which "
                        f"transformers (and vLLM) refuse: export --to gguf instead, or prune with --width-multiple "
                        f"{model_args.n_heads}")


def main(argv=None) -> Path:
    args = parse_config(ExportArgs, argv)
    made_out = args.to == "hf" and not Path(args.out or ".").exists()
    out = check_out(args)
    model, tokenizer = checkpoint.load(args.ckpt, device="cpu", dtype=DTYPES[args.dtype])
    if args.to == "hf":
        try:
            check_hf_width(model.args)
        except UserError:
            if made_out:  # check_out made it to test it: a refused export leaves nothing behind
                out.rmdir()
            raise
        checkpoint.export_hf(model, tokenizer, out)
    else:
        write_gguf(model, vocab_of(tokenizer), out, args.gguf_type)
    a = model.args
    print(f"wrote {out} ({args.to}{'' if args.to == 'hf' else ' ' + args.gguf_type}): width {a.dim}, "
          f"{a.n_heads} heads of {a.head_dim}, {a.n_layers} layers")
    return out


if __name__ == "__main__":
    cli_main(main)
