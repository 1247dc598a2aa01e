"""Write one section of bench/RESULTS.md, keeping the others."""
import os
import re
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(title: str, body: str) -> None:
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    block = f"## {title}\n\n_measured {time.strftime('%Y-%m-%d')}_\n\n{body}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda m: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    with open(RESULTS, "w") as f:
        f.write(text)
