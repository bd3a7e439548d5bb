#!/usr/bin/env python
"""Count the machine instructions (SASS) of chosen CUDA kernels, from `cuobjdump -sass` output.

    cuobjdump -sass mspcnn/_C*.so | python tools/sass_summary.py [--match REGEX] [--arch sm_90] [--top 25]
    python tools/sass_summary.py FILE [...]

What the PTX cannot say, the SASS does: whether `ptxas` fused a product into an addition (FFMA
against FMUL + FADD), whether a shared-memory float atomicAdd is one instruction or a compare-and-swap
loop (ATOMS.CAST.SPIN), how many shared loads of each width (LDS, LDS.64, LDS.128) a kernel body
issues. These are static counts (each instruction of the code once, loops not multiplied out), per
kernel, by opcode with its modifiers, largest first, then by family (the opcode before its first '.').
A kernel is chosen when REGEX matches its mangled or its shortened name (default: every kernel of
namespace mspcnn). tools/gpu_check.sh runs it on the built extension, since the development machines
have nvcc but no cuobjdump.
"""
import argparse
import re
import sys
from collections import Counter

from mspcnn.cli import run

# "/*0a30*/  @!P0 LDS.128 R4, [R2+0x10] ;  /* 0x... */": the offset, an optional predicate, the opcode
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_ARCH = re.compile(r"^\s*code for (sm_\d+a?)")


_TYPES = {"f": "float", "d": "double", "i": "int", "j": "unsigned", "l": "long", "b": "bool", "c": "char"}


def short_name(mangled):
    """A readable name for a mangled kernel: the identifier after its namespaces, with its template
    arguments where they are numbers, booleans or plain types, e.g.
    _ZN6mspcnn4cuda..16max_tiled_kernelILi5ELi5ELi16EEEv... -> max_tiled_kernel<5, 5, 16>.
    Anything else is returned as it is."""
    if not mangled.startswith("_ZN"):
        return mangled
    i, names = 3, []
    while i < len(mangled) and mangled[i].isdigit():
        j = i
        while mangled[j].isdigit():
            j += 1
        n = int(mangled[i:j])
        names.append(mangled[j:j + n])
        i = j + n
    if not names:
        return mangled
    args = []
    if i < len(mangled) and mangled[i] == "I":
        i += 1
        while i < len(mangled) and mangled[i] != "E":
            if mangled[i] == "L" and i + 1 < len(mangled):  # a literal: L <type> <value> E
                end = mangled.find("E", i)
                if end < 0:
                    break
                kind, value = mangled[i + 1], mangled[i + 2:end].replace("n", "-")
                args.append(("true" if value == "1" else "false") if kind == "b" else value)
                i = end + 1
            elif mangled[i] in _TYPES:
                args.append(_TYPES[mangled[i]])
                i += 1
            else:
                break
    return f"{names[-1]}<{', '.join(args)}>" if args else names[-1]


def parse(lines, arch=None):
    """{(arch, mangled name): Counter of opcodes} from cuobjdump -sass output."""
    out, cur_arch, cur = {}, None, None
    for line in lines:
        a = _ARCH.match(line)
        if a:
            cur_arch, cur = a.group(1), None
            continue
        f = _FUNC.match(line)
        if f:
            cur = None if arch and cur_arch != arch else out.setdefault((cur_arch, f.group(1)), Counter())
            continue
        if cur is not None:
            m = _INSTR.search(line)
            if m:
                cur[m.group(1)] += 1
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="cuobjdump -sass output (default: standard input)")
    p.add_argument("--match", default="mspcnn", help="regular expression on the kernel's mangled or short name "
                   "(default: mspcnn)")
    p.add_argument("--arch", help="only this architecture's code (e.g. sm_90; default: all)")
    p.add_argument("--top", type=int, default=25, help="opcodes listed per kernel (default 25)")
    args = p.parse_args(argv)
    try:
        pattern = re.compile(args.match)
    except re.error as e:
        raise ValueError(f"--match {args.match!r}: not a regular expression ({e})") from None
    if args.top < 1:
        raise ValueError("--top must be positive")
    lines = []
    for path in args.files:
        with open(path, errors="replace") as f:
            lines += f.read().splitlines()
    if not args.files:
        lines = sys.stdin.read().splitlines()
    found = {k: v for k, v in parse(lines, args.arch).items() if pattern.search(k[1]) or pattern.search(short_name(k[1]))}
    if not found:
        raise ValueError(f"no kernel matching {args.match!r} in the SASS given"
                         f"{' for ' + args.arch if args.arch else ''} (is it `cuobjdump -sass` output?)")
    for (arch, name), counts in sorted(found.items(), key=lambda kv: (kv[0][0] or "", short_name(kv[0][1]))):
        fam = Counter()
        for op, n in counts.items():
            fam[op.split(".")[0]] += n
        print(f"{short_name(name)}  [{arch}]  {sum(counts.values())} instructions")
        print("  " + "  ".join(f"{op} {n}" for op, n in counts.most_common(args.top)))
        print("  families: " + "  ".join(f"{op} {n}" for op, n in fam.most_common(args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
