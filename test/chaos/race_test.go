//go:build race

package chaos

// raceEnabled: this test runs with -race, so the server it builds does too,
// and shares the race-built packages of the same go test run.
const raceEnabled = true
