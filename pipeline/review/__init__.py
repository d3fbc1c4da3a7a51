"""The moderation review queue: a web app and JSON API for human reviewers (issue 5,
docs/review-queue.md)."""
