// Package sim runs the real pool manager (package pool) against a trace of
// CI jobs under a virtual clock and a simulated cloud, and measures what a
// pool policy costs (instance-hours) and what it buys (the jobs' waits),
// against a clairvoyant oracle (Oracle). `hangar simulate` is its CLI.
//
// Nothing sleeps and nothing runs concurrently: the Manager is made with
// pool.Simulation, so its cloud calls are made in order by Settle, its ids
// come from a seeded source, and the engine (Simulate) steps it through
// the trace's events and the pool's timers. The same inputs give the same
// report, byte for byte.
//
// The simulated instances do what the bootstrap does: after their boot
// time they authenticate with the token in their user-data and report
// ready; told of a lease they start its worker; told of its release they
// stop it and poll again. The simulated clients lease with an unlimited
// wait (they ask again before their pending lease would be given up),
// hold their instance for the job's duration, and release it for reuse.
package sim
