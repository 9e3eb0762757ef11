"""Progress (kvmmu.cliargs.Progress): shown after the delay, with a rate and the time left, ending at
100 %; whole lines when the stream is not a terminal; nothing with quiet or for quick work."""

from __future__ import annotations

import io
import re

from kvmmu.cliargs import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_lines_at_each_quarter_and_at_100_percent() -> None:
    out = io.StringIO()
    p = Progress("run x", stream=out, delay=0)
    for i in range(101):
        p(i / 100)
    p.done()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [re.search(r"(\d+\.\d)%", x).group(1) for x in lines] == ["0.0", "25.0", "50.0", "75.0", "100.0"]
    for line in lines[1:]:
        assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, [\d.]+%/s\]", line), line       # elapsed<left, rate


def test_done_brings_a_shown_meter_to_100_percent_even_if_the_work_reported_less() -> None:
    out = io.StringIO()
    p = Progress("compare", stream=out, delay=0)
    p.part(0, 3, "compare shadow/off")(0.5)
    p.done()
    assert out.getvalue().splitlines()[-1].startswith("compare shadow/off: 100.0%")


def test_counted_units_show_the_count_and_their_rate() -> None:
    out = io.StringIO()
    p = Progress("real-diff", stream=out, delay=0, total=8, unit="program")
    for i in range(1, 9):
        p(i / 8)
    p.done()
    last = out.getvalue().splitlines()[-1]
    assert "8/8" in last and "program/s" in last and "100%" in last


def test_parts_never_move_the_meter_backwards() -> None:
    out = io.StringIO()
    p = Progress("x", stream=out, delay=0)
    p.part(1, 2, "second")(0.0)
    p(0.9)          # a stale callback of part 0 would be 0.45 overall
    p.done()
    values = [float(re.search(r"(\d+\.\d)%", x).group(1)) for x in out.getvalue().splitlines()]
    assert values == sorted(values) and values[-1] == 100.0


def test_quick_work_and_quiet_print_nothing() -> None:
    out = io.StringIO()
    p = Progress("x", stream=out)           # the default delay: a second
    p(0.5)
    p(1.0)
    p.done()
    q = Progress("x", quiet=True, stream=out, delay=0)
    q(0.5)
    q.done()
    assert out.getvalue() == ""


def test_a_terminal_gets_one_bar_redrawn_in_place() -> None:
    out = _Tty()
    p = Progress("run x", stream=out, delay=0)
    for i in range(11):
        p(i / 10)
    p.done()
    text = out.getvalue()
    assert "\r" in text and text.rstrip().endswith("%/s]") and "100.0%" in text
    assert text.count("\n") == 1
