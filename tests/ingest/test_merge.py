"""The merge rules as properties of the pure fold: any arrival order converges."""

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.ingest.merge import StoredPatch, fold_run, rank_key
from receiver.vocabulary import precedence

T0 = datetime(2026, 11, 1, tzinfo=UTC)
STATUSES = ["queued", "dispatching", "running", "succeeded", "failed", "cancelled"]
FIELDS = ["client_ref", "failure_code", "model", "cost_label", "output"]


def patch(fields, received, delivery_id):
    return StoredPatch(
        fields=fields, received_at=T0 + timedelta(seconds=received), delivery_id=delivery_id
    )


@st.composite
def delivery_sets(draw):
    """Payloads for one run whose ranks all differ (distinct precedence or completed_at)."""
    count = draw(st.integers(min_value=1, max_value=6))
    ranks = draw(
        st.lists(
            st.tuples(st.sampled_from(STATUSES), st.integers(0, 1000)),
            min_size=count,
            max_size=count,
            unique_by=lambda r: (precedence(r[0]), r[1] if precedence(r[0]) == 3 else 0),
        )
    )
    payloads = []
    for status, completed in ranks:
        fields = {"status": status}
        if precedence(status) == 3:
            fields["completed_at"] = T0 + timedelta(seconds=completed)
        for name in FIELDS:
            fields[name] = draw(st.one_of(st.none(), st.sampled_from(["a", "b", "c"])))
        payloads.append(fields)
    return payloads


def expected_row(payloads):
    """Independent statement of the rules: per field, the best-ranked payload that has a value."""

    def strength(fields):
        level = precedence(fields.get("status"))
        done = fields.get("completed_at")
        return (level, done is not None, done or T0)

    best_first = sorted(payloads, key=strength, reverse=True)
    row = {}
    for name in {key for fields in payloads for key in fields}:
        for fields in best_first:
            if fields.get(name) is not None:
                row[name] = fields[name]
                break
    return row


@settings(max_examples=300)
@given(payloads=delivery_sets(), order=st.randoms())
def test_every_arrival_order_yields_the_same_row(payloads, order):
    shuffled = payloads[:]
    order.shuffle(shuffled)
    arrived = [patch(fields, i, i + 1) for i, fields in enumerate(shuffled)]
    assert fold_run(arrived).fields == expected_row(payloads)


@settings(max_examples=200)
@given(payloads=delivery_sets(), data=st.data())
def test_duplicates_change_nothing(payloads, data):
    arrived = [patch(fields, i, i + 1) for i, fields in enumerate(payloads)]
    again = data.draw(st.sampled_from(arrived))
    redelivered = [*arrived, patch(dict(again.fields), len(arrived) + 5, len(arrived) + 9)]
    assert fold_run(redelivered).fields == fold_run(arrived).fields


@settings(max_examples=200)
@given(payloads=delivery_sets())
def test_a_null_never_erases_a_value(payloads):
    arrived = [patch(fields, i, i + 1) for i, fields in enumerate(payloads)]
    folded = fold_run(arrived).fields
    for name in FIELDS:
        if any(fields.get(name) is not None for fields in payloads):
            assert folded.get(name) is not None


@settings(max_examples=200)
@given(payloads=delivery_sets())
def test_status_never_moves_backwards(payloads):
    arrived = [patch(fields, i, i + 1) for i, fields in enumerate(payloads)]
    final = precedence(fold_run(arrived).fields["status"])
    assert final == max(precedence(fields["status"]) for fields in payloads)


def test_later_completed_at_wins_between_terminal_payloads():
    early = patch({"status": "failed", "completed_at": T0, "failure_code": "x"}, 5, 1)
    late = patch({"status": "succeeded", "completed_at": T0 + timedelta(seconds=1)}, 1, 2)
    assert fold_run([early, late]).fields["status"] == "succeeded"
    assert fold_run([late, early]).fields["status"] == "succeeded"
    # The loser still fills what the winner left empty.
    assert fold_run([late, early]).fields["failure_code"] == "x"


def test_equal_completed_at_later_received_wins():
    first = patch({"status": "failed", "completed_at": T0}, 1, 1)
    second = patch({"status": "succeeded", "completed_at": T0}, 2, 2)
    assert fold_run([second, first]).fields["status"] == "succeeded"


def test_terminal_without_completed_at_ranks_below_one_with_it():
    stamped = patch({"status": "failed", "completed_at": T0}, 1, 1)
    unstamped = patch({"status": "succeeded"}, 2, 2)
    assert rank_key(unstamped) < rank_key(stamped)
    assert fold_run([stamped, unstamped]).fields["status"] == "failed"


def test_counts_and_received_bounds():
    merged = fold_run([patch({"status": "running"}, 3, 1), patch({"status": "queued"}, 1, 2)])
    assert merged.delivery_count == 2
    assert merged.first_received_at == T0 + timedelta(seconds=1)
    assert merged.last_received_at == T0 + timedelta(seconds=3)
