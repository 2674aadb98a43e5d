"""Chat templates render within bounds: no single value, output, amount of work, number of steps
or wall-clock time beyond its limit, whatever the template does (the model's own included)."""

from __future__ import annotations

import resource
import time

import pytest

from splitserve.models.chat_template import ChatTemplateError, render_chat_template
from splitserve.models.template_limits import LimitKind, RenderLimits

MESSAGES = [{"role": "user", "content": "hi"}]
LIMITS = RenderLimits(max_output_chars=200_000, max_value_chars=200_000)

HOSTILE = {
    "string repetition": ("{{ 'ab ' * 100000000 }}", LimitKind.VALUE),
    "nested range loops": ("{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
                           LimitKind.OPERATIONS),
    "loops that print": ("{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}",
                         LimitKind.OUTPUT),
    "doubling with ~": ("{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}"
                        "{% endfor %}", LimitKind.VALUE),
    "doubling with +": ("{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}"
                        "{% endfor %}", LimitKind.VALUE),
    "list repetition": ("{{ [1] * 1000000000 }}", LimitKind.VALUE),
    "center filter": ("{{ 'x'|center(1000000000) }}", LimitKind.VALUE),
    "str.ljust": ("{{ 'x'.ljust(1000000000) }}", LimitKind.VALUE),
    "str.format width": ("{{ '{:>1000000000}'.format(1) }}", LimitKind.VALUE),
    "% width": ("{{ '%1000000000d' % 1 }}", LimitKind.VALUE),
    "format filter": ("{{ '%1000000000d'|format(1) }}", LimitKind.VALUE),
    "huge power": ("{{ 10 ** 100000000 }}", LimitKind.VALUE),
    "squaring integers": ("{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
                          "{% endfor %}", LimitKind.VALUE),
    "join filter": ("{{ (['x' * 100000] * 100000)|join }}", LimitKind.VALUE),
    "str.join": ("{{ ''.join(['x' * 100000] * 100000) }}", LimitKind.VALUE),
    "replace filter": ("{{ ('x' * 100000)|replace('x', 'yyyyyyyyyyyyy') }}", LimitKind.VALUE),
    "str.replace": ("{{ ('x' * 100000).replace('x', 'yyyyyyyyyyyyy') }}", LimitKind.VALUE),
    "sum of lists": ("{{ ([range(1000)|list] * 100000)|sum(start=[]) }}", LimitKind.VALUE),
    "batch fill": ("{{ [1]|batch(1000000000, 'x')|list }}", LimitKind.VALUE),
    "indent": ("{{ ('x\n' * 100000)|indent(100000) }}", LimitKind.VALUE),
    "wordwrap": ("{{ ('x ' * 100000)|wordwrap(1, wrapstring='y' * 100000) }}", LimitKind.VALUE),
    "tojson indent": ("{{ messages|tojson(indent=100000000) }}", LimitKind.VALUE),
    "work": ("{% for i in range(100000) %}{% set x = 'y' * 150000 %}{% endfor %}", LimitKind.WORK),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_stops_quickly_with_little_memory(name):
    source, kind = HOSTILE[name]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError) as err:
        render_chat_template(source, MESSAGES, limits=LIMITS)
    assert time.perf_counter() - t0 < 3
    assert err.value.limit is kind, err.value
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100


@pytest.mark.parametrize("source,fragment", [
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{% for x in [1] recursive %}{{ loop(range(100000)) }}{% endfor %}", "RecursionError"),
    ("{{ lipsum(n=1000000) }}", "lipsum"),
    ("{{ 'a'.translate({97: 'b' * 100000}) }}", "translate"),
    ("{{ 'a\tb'.expandtabs(1000000000) }}", "expandtabs"),
])
def test_other_escapes_are_template_errors(source, fragment):
    with pytest.raises(ChatTemplateError, match=fragment):
        render_chat_template(source, MESSAGES, limits=LIMITS)


def test_deadline_stops_a_slow_loop():
    # Each step is cheap enough for every other bound; only the clock stops it.
    slow = "{% for i in range(100000) %}{% if messages[0].content.count('zz') > 10 %}x{% endif %}{% endfor %}"
    messages = [{"role": "user", "content": "ab " * 60000}]
    limits = RenderLimits(max_seconds=0.3, max_operations=10**9)
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError) as err:
        render_chat_template(slow, messages, limits=limits)
    assert err.value.limit is LimitKind.TIME
    assert time.perf_counter() - t0 < 2.0


def test_ordinary_templates_render_as_before():
    source = ("{% for m in messages %}{{ '<|' ~ m.role ~ '|>' + m.content|trim + '\n' }}{% endfor %}"
              "{% if tools %}{{ tools|tojson }}{% endif %}{{ '%s-%d' % ('a', 3) }}{{ '{}!'.format('b') }}"
              "{{ ', '.join(['x', 'y']) }}{{ 'ab'.replace('a', 'c') }}{% for k, v in {'q': 1}.items() %}{{ k }}"
              "{{ v }}{% endfor %}{{ loop }}")
    out = render_chat_template(source, [{"role": "user", "content": " hi "}], tools=[{"type": "function"}])
    assert out == '<|user|>hi\n[{"type": "function"}]a-3b!x, ycbq1'


def test_limits_apply_outside_the_server_too():
    # the default limits hold for any caller of render_chat_template
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ 'ab ' * 100000000 }}", MESSAGES)
