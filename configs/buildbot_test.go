package configs

import "testing"

// A pool on builtin:buildbot-worker.sh runs that script's Buildbot worker
// unless it sets a worker_command of its own.
func TestBuiltinBootstrapWorkerCommand(t *testing.T) {
	c, err := Parse("hangar.toml", []byte(`
[providers.local]
type = "local"
[pools.bb]
provider = "local"
bootstrap = "builtin:buildbot-worker.sh"
[pools.own]
provider = "local"
bootstrap = "builtin:buildbot-worker.sh"
worker_command = "exec my-worker"
[pools.generic]
provider = "local"
`))
	if err != nil {
		t.Fatal(err)
	}
	for pool, want := range map[string]string{
		"bb":      `exec bash "$HANGAR_BUILDBOT_START"`,
		"own":     "exec my-worker",
		"generic": "",
	} {
		if got := c.Pools[pool].WorkerCommand; got != want {
			t.Errorf("pools.%s.worker_command = %q, want %q", pool, got, want)
		}
	}
}
