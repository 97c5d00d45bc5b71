package pool

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestValidateRequest(t *testing.T) {
	cases := []struct {
		name string
		r    LeaseRequest
		bad  string // part of the error; "" for valid
	}{
		{"defaults", LeaseRequest{}, ""},
		{"ttl at the minimum", LeaseRequest{TTL: time.Second}, ""},
		{"ttl below the minimum", LeaseRequest{TTL: time.Nanosecond}, "ttl must be between 1s"},
		{"negative ttl", LeaseRequest{TTL: -time.Second}, "ttl must be between 1s"},
		{"ttl over the pool's max", LeaseRequest{TTL: 2 * time.Hour}, "max_lease_ttl"},
		{"negative wait", LeaseRequest{Wait: -time.Second}, "wait must be"},
		{"master host:port", LeaseRequest{Worker: Worker{Master: "buildbot.example.com:9989"}}, ""},
		{"master URL", LeaseRequest{Worker: Worker{Master: "https://jenkins.example.com/ci/"}}, ""},
		{"master option", LeaseRequest{Worker: Worker{Master: "-oProxyCommand=x:1"}}, "worker.master"},
		{"master URL with credentials", LeaseRequest{Worker: Worker{Master: "https://u:p@jenkins.example.com/"}}, "worker.master"},
		{"worker name option", LeaseRequest{Worker: Worker{Name: "-rf"}}, "worker.name"},
		{"client token with a newline", LeaseRequest{ClientToken: "a\nb"}, "client_token"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := validateRequest(c.r, time.Hour)
			switch {
			case c.bad == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case c.bad != "" && (err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.bad)):
				t.Fatalf("err %v, want ErrInvalid mentioning %q", err, c.bad)
			}
		})
	}
}
