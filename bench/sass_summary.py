"""Reads `cuobjdump --dump-sass` of soniq's extension on stdin and prints, per soniq kernel,
the instruction count and the opcodes that show what it runs on: tensor-core IMMA/HMMA
(and BMMA), POPC, cp.async (LDGSTS), barriers (BAR), and local-memory traffic (LDL/STL:
spills). A u4 mma that the chip emulates shows up as several IMMA or extra ALU per mma."""
import re
import sys
from collections import Counter

KEYS = ("IMMA", "HMMA", "BMMA", "POPC", "LDGSTS", "BAR", "LDL", "STL", "SHFL", "VOTE")


def main():
    name, counts, out, arch = None, Counter(), [], "?"
    for line in sys.stdin:
        a = re.search(r"arch = (sm_\w+)", line)  # each cubin of a multi-arch build says its target
        if a:
            arch = a.group(1)
        m = re.search(r"Function : (\S+)", line)
        if m:
            if name:
                out.append((name, counts))
            name, counts = f"[{arch}] {m.group(1)}", Counter()
            continue
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if name and op and op.group(1) != "NOP":  # NOP: the padding after a function's code
            counts["total"] += 1
            for k in KEYS:
                if op.group(1).startswith(k):
                    counts[k + (op.group(2) or "")] += 1
    if name:
        out.append((name, counts))
    for name, counts in out:
        if "soniq" not in name:
            continue
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "total")
        print(f"{name[:110]}: {counts['total']} instructions; {detail}")


if __name__ == "__main__":
    main()
