"""The dialogue manager: conversation state (sessions in SQLite), history policy, prompt assembly."""
