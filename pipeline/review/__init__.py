"""The moderation review queue: a web app and JSON API for human reviewers
(docs/review-queue.md)."""
