"""Grounding glue: the retrieval query of a conversation, and passages placed in the system message."""
from kuaida.dialogue.grounding import INSTRUCTION, grounded_messages, retrieval_query
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


def test_passages_go_after_the_persona_with_ids_in_brackets():
    messages = [{"role": "system", "content": "You are Lumo's support agent."}, user("reset?")]
    out = grounded_messages(messages, [p("setup.md#3", "Hold the pin for 12 s.", "Setup > Reset"),
                                       p("faq.jsonl#1", "It costs 129 euros.", "Price?")])
    system = out[0]["content"]
    assert system.startswith("You are Lumo's support agent.\n\n")
    assert "[setup.md#3] Setup > Reset\nHold the pin for 12 s." in system
    assert "[faq.jsonl#1] Price?\nIt costs 129 euros." in system
    assert INSTRUCTION.split("[")[0] in system
    assert out[1:] == messages[1:] and messages[0]["content"] == "You are Lumo's support agent."  # not mutated


def test_new_system_message_when_there_is_none_and_nothing_added_without_passages():
    out = grounded_messages([user("hi")], [p("a.md#1", "text")])
    assert [m["role"] for m in out] == ["system", "user"] and "[a.md#1]" in out[0]["content"]
    assert grounded_messages([user("hi")], []) == [user("hi")]


def test_same_passages_in_any_rank_order_give_the_same_prompt_prefix():
    a, b, c = p("b.md#10", "ten"), p("b.md#2", "two"), p("a.md#7", "seven")
    first = grounded_messages([user("q1")], [a, b, c])[0]["content"]
    later = grounded_messages([user("q1"), assistant("r"), user("q2")], [c, a, b])[0]["content"]
    assert first == later
    assert first.index("[a.md#7]") < first.index("[b.md#2]") < first.index("[b.md#10]")  # numeric order
