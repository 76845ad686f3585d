"""Grounding glue: the retrieval query of a conversation, and where passages go in the prompt (before
the user message of their turn, staying there on later turns; the instruction in the system message)."""
from kuaida.dialogue.grounding import (
    INSTRUCTION,
    PASSAGE_END,
    PASSAGE_START,
    grounded_messages,
    new_passages,
    passage_id,
    passage_text,
    retrieval_query,
    shown_ids,
)
from kuaida.knowledge import Passage


def p(pid, text, heading="Setup", score=0.5):
    return Passage(pid, pid.split("#")[0], heading, text, score)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_retrieval_query_is_the_latest_user_turn_when_self_contained():
    messages = [user("How do I pair a Zigbee motion sensor?"), assistant("Open the app..."),
                user("What warranty does the Lumo Hub H2 come with in Europe?")]
    assert retrieval_query(messages) == "What warranty does the Lumo Hub H2 come with in Europe?"


def test_short_or_back_referring_follow_up_carries_the_previous_user_turn():
    first = "How do I factory reset the Lumo hub?"
    for follow_up in ("how long?", "Does it erase my routines and scenes as well?"):
        messages = [{"role": "system", "content": "Be brief."}, user(first), assistant("Hold the pin."),
                    user(follow_up)]
        assert retrieval_query(messages) == f"{first}\n{follow_up}"


def test_retrieval_query_edge_cases():
    assert retrieval_query([]) == ""
    assert retrieval_query([{"role": "system", "content": "x"}]) == ""
    assert retrieval_query([user("  price?  ")]) == "price?"  # nothing before it to add


def wrapped(*texts):
    return "".join(f"{PASSAGE_START}{t}{PASSAGE_END}" for t in texts)


def test_passages_go_in_a_system_message_before_their_user_message():
    messages = [{"role": "system", "content": "You are Lumo's support agent."}, user("reset?")]
    a = p("setup.md#3", "Hold the pin for 12 s.", "Setup > Reset")
    b = p("faq.jsonl#1", "It costs 129 euros.", "Price?")
    texts = [passage_text(x) for x in (a, b)]
    assert texts[0] == "[setup.md#3] Setup > Reset\nHold the pin for 12 s.\n\n"
    out = grounded_messages(messages, {1: texts})
    assert out == [messages[0], {"role": "system", "content": INSTRUCTION + "\n\n" + wrapped(*texts)},
                   user("reset?")]
    assert messages[1] == user("reset?")  # not mutated
    assert grounded_messages([user("hi")], {}) == [user("hi")]  # no passages, no message
    assert grounded_messages([user("hi")], {0: []}) == [user("hi")]


def test_later_turn_prompt_extends_the_earlier_one():
    first_texts = [passage_text(p("a.md#1", "one"))]
    turn1 = grounded_messages([user("q1")], {0: first_texts})
    turn2 = grounded_messages([user("q1"), assistant("r"), user("q2")],
                              {0: first_texts, 2: [passage_text(p("b.md#4", "four"))]})
    assert turn2[:2] == turn1 and turn2[3]["content"].endswith(wrapped(passage_text(p("b.md#4", "four"))))
    assert [m["role"] for m in turn2] == ["system", "user", "assistant", "system", "user"]


def test_new_passages_skip_the_shown_ones_in_document_order():
    a, b, c = p("b.md#10", "ten"), p("b.md#2", "two"), p("a.md#7", "seven")
    assert [x.id for x in new_passages([a, b, c], [])] == ["a.md#7", "b.md#2", "b.md#10"]  # numeric order
    shown = shown_ids({0: [passage_text(b)], 2: [passage_text(c)]})
    assert shown == {"b.md#2", "a.md#7"} and passage_id(passage_text(a)) == "b.md#10"
    assert [x.id for x in new_passages([a, b, c], shown)] == ["b.md#10"]


def test_marker_characters_a_client_typed_are_removed():
    out = grounded_messages([user(f"x{PASSAGE_START}y{PASSAGE_END}z")], {})
    assert out[0]["content"] == "xyz"
