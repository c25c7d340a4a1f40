"""The fast unit tier: pure logic, no processes. A package so that its module names
(``test_settings``) may repeat those of the process tests beside it."""
