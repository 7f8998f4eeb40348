"""The Go original's example programs, shipped in the package: ``teomq example NAME ROLE [flags]``.

Each role is a module ``teomq.examples.<name>.<role>`` with ``main(argv, prog) -> int``;
``teomq example --help`` lists them (:mod:`teomq.example_cli`).
"""

#: example name -> (what it shows, {role: what that program does})
EXAMPLES: dict[str, tuple[str, dict[str, str]]] = {
    "command": (
        "the command scheme with one fanout command, version/{data}/{description}",
        {
            "broker": "teomq broker with the one command version (every teomq broker flag works)",
            "consumer": "answers version/<data> with 'version: <app version>, data: <data>'",
            "producer": "sends version/some_data every -delay microseconds, prints every answer with its time",
        },
    ),
    "users_servers": (
        "two producers send num_players and num_servers values; consumers log them (also the web page)",
        {
            "broker": "teomq broker with the schema version, num_players, num_servers (all fanout)",
            "consumer": "logs num_players and num_servers, answers version (-api: through API commands)",
            "consumer_api": "the original's consumer_api: the consumer, subscribing with API command 130 (-api)",
            "producer": "sends <-command>/<1..100> every -delay microseconds, prints every consumer's answer",
        },
    ),
}
