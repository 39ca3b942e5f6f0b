"""Alerting: rules kept as data, evaluated by one process at a time, notified through an outbox.

rules.py      the rule model, YAML loading, and storage
evaluate.py   metric queries and the ok → pending → firing → resolved state machine
notify.py     notification bodies, Receiver-Signature, and the retrying outbox sender
"""
