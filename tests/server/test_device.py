"""Device turns: first come, first served, and a holder that pauses lets everyone queued go first."""
import threading
import time

from rfserve.server.device import DeviceTurns


def test_a_pausing_holder_alternates_with_a_waiting_thread():
    turns, order = DeviceTurns(), []
    other_queued = threading.Event()

    def other():
        for i in range(3):
            other_queued.set()
            with turns.turn():
                order.append(f"chat{i}")

    with turns.turn():
        worker = threading.Thread(target=other)
        worker.start()
        other_queued.wait(5)
        while not turns.queued:
            time.sleep(0.001)
        for step in range(3):
            order.append(f"step{step}")
            turns.pause()
            while worker.is_alive() and not turns.queued and step < 2:   # the other thread comes back
                time.sleep(0.001)
    worker.join(5)
    assert order == ["step0", "chat0", "step1", "chat1", "step2", "chat2"]


def test_pause_with_nobody_queued_keeps_the_turn():
    turns = DeviceTurns()
    with turns.turn():
        turns.pause()
        assert turns.queued == 0
    with turns.turn():                   # released exactly once: the next turn starts at once
        pass
