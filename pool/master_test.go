package pool

import "testing"

// A worker's master is a Buildbot master's host:port or a Jenkins
// controller's root URL.
func TestValidMaster(t *testing.T) {
	tests := []struct {
		master string
		ok     bool
	}{
		{"ci.example:9989", true},
		{"[::1]:9989", true},
		{"https://ci.example.com/", true},
		{"http://127.0.0.1:8080/jenkins/", true},
		{"ci.example", false},
		{":9989", false},
		{"https://", false},
		{"https://user:token@ci.example.com/", false},
		{"https://ci.example.com/a b", false},
		{"https://ci.example.com/\n", false},
		{"ftp://ci.example.com/", false},
	}
	for _, tt := range tests {
		if got := validMaster(tt.master); got != tt.ok {
			t.Errorf("validMaster(%q) = %v, want %v", tt.master, got, tt.ok)
		}
	}
}
