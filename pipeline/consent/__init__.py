"""Consent: the rule every clip must pass, the ledger service that records consent, and
the daily expiry sweep.

- `pipeline.consent.rules`: the rule as pure functions over consent records and a time;
- `pipeline.consent.check`: the rule applied to a job's subjects, on the stored ledger;
- `pipeline.consent.service`: `ConsentService` (challenge, grant, revoke, expire, show);
- `pipeline.consent.expiry`: `expire_consents`, the sweep behind the consent_sweep DAG.

Nothing is imported here, so that reading the rule does not load the face engine.
"""
