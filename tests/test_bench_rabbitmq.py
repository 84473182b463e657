"""The RabbitMQ benchmark (``python -m bench --only rabbitmq``) runs with tiny
counts; the figures are the benchmark's business, not the suite's."""

from bench import rabbitmq


def test_the_rabbitmq_scenarios_run_with_tiny_counts(amqp_url, monkeypatch):
    monkeypatch.setattr(rabbitmq, "AMQP_URL", amqp_url)
    scenarios = rabbitmq.run(True, tasks=3, rounds=2)
    rounds = [(len(s.baseline), len(s.ours)) for s in scenarios]
    print(f"scenarios {[s.name for s in scenarios]}, rounds {rounds}")
    assert rounds == [(2, 2)] * 4
    assert all(value > 0 for s in scenarios for value in s.baseline + s.ours)
