"""``teomq bench``: end-to-end benchmarks of teomq and of peer brokers through one harness.

Modules: :mod:`.driver` (the contract a system under test implements), :mod:`.teomq_driver`
(teomq's own), :mod:`.harness` (parent: processes, schedule, broker accounting),
:mod:`.workers` (client processes: the workloads), :mod:`.proc_stats` (/proc and getrusage
counters), :mod:`.stats` (percentiles), :mod:`.report` (result document, table, machine info),
:mod:`.progress` (the progress bar), :mod:`.command` (the ``teomq bench`` command line).

Nothing here is imported by the broker or the clients.
"""
