"""The call-time snapshot: exactly what the worker will see, taken at the call.

Plain arguments skip the serializer's round trip; a property test holds the
shortcut to the round trip's own answer.
"""

from hypothesis import given
from hypothesis import strategies as st
from kombu.serialization import dumps, loads

from pyramid_tasks.datamanager import snapshot


class FakeTask:
    """Only what snapshot() reads of a task: its name and serializer."""

    name = "t.snapshot"
    serializer = "json"


keys = st.text() | st.integers()  # JSON makes an int key a string
scalars = st.none() | st.booleans() | st.integers() | st.text()
scalars |= st.floats(allow_nan=False)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner) | st.tuples(inner) | st.dictionaries(st.text(), inner)
    ),
    max_leaves=5,
)


def round_trip(args, kwargs):
    content_type, encoding, data = dumps((args or (), kwargs or {}), serializer="json")
    args, kwargs = loads(data, content_type, encoding, accept={content_type})
    return tuple(args), kwargs


@given(
    args=st.none() | st.lists(values) | st.tuples(values, values),
    kwargs=st.none() | st.dictionaries(keys, values, max_size=3),
)
def test_the_snapshot_is_the_json_round_trip(args, kwargs):
    assert snapshot(FakeTask(), args, kwargs, {}) == round_trip(args, kwargs)


def test_plain_arguments_are_copied_not_shared():
    args, kwargs = [1, "a"], {"b": 2.5}
    taken = snapshot(FakeTask(), args, kwargs, {})
    args.append(3)
    kwargs["c"] = None
    assert taken == ((1, "a"), {"b": 2.5})


class Options(dict):
    """A dict subclass: the round trip returns a plain dict."""


def test_a_dict_subclass_takes_the_round_trip():
    (), kwargs = snapshot(FakeTask(), (), Options(a=1), {})
    assert type(kwargs) is dict and kwargs == {"a": 1}


def test_a_string_as_args_is_what_the_round_trip_makes_of_it():
    assert snapshot(FakeTask(), "ab", None, {}) == round_trip("ab", None)
