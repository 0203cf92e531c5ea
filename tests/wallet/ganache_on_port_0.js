// Start ganache (from NODE_PATH) on 127.0.0.1 port 0 and print the port it got, then serve until killed.
const ganache = require("ganache");
const server = ganache.server({
  chain: { chainId: 1337, hardfork: "shanghai" },
  wallet: { totalAccounts: 2, defaultBalance: 1000 },
  logging: { quiet: true },
});
server.listen(0, "127.0.0.1", (err) => {
  if (err) { console.error(String(err)); process.exit(1); }
  console.log(`port ${server.address().port}`);
});
