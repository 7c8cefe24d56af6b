"""The README's Python tour runs: every ``>>>`` example in README.md goes through doctest."""

import doctest
import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_examples_run():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    # A closing ``` fence right after an example would be read as its expected output.
    text = re.sub(r"^```.*$", "", text, flags=re.M)
    test = doctest.DocTestParser().get_doctest(text, {}, "README.md", README, 0)
    assert len(test.examples) > 40  # the tour is there
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=print)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} README examples failed (output above)"
